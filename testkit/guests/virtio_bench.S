/* Throughput guest for the virtio benchmark. For each device present it prints "<phase> start",
 * runs a fixed amount of work and prints "<phase> done <count>"; the host times the lines.
 *  blk:   seq  — 2048 reads of 64 KiB, 8 in flight, sequential, wrapping at the disk's end;
 *         iops — 8192 reads of 4 KiB, 8 in flight, at pseudo-random 4 KiB-aligned offsets.
 *         Each request is 2 descriptors: header, then data with the status byte appended.
 *  net:   tx   — 16384 frames of 64 bytes, 8 in flight.
 *  vsock: rt   — 4096 round trips of 64 bytes with an echo server on host port 5001. */
    .code64
    .include "virtio_defs.S"
    .text
    .globl _start

    .set Q0, 0x200000
    .set Q1, 0x201000
    .set Q2, 0x202000
    .set HDRS, 0x210000             /* request headers, 16 bytes each */
    .set BUFS, 0x400000             /* data buffers, 0x11000 apart */
    .set BUFSTRIDE, 0x11000
    .set DEPTH, 8
    .set SEQ_COUNT, 2048
    .set IOPS_COUNT, 8192
    .set TX_COUNT, 16384
    .set RT_COUNT, 4096
    .set VS_RXBUF, 0x300000
    .set VS_TXBUF, 0x310000

_start:
    call virtio_boot
    mov $2, %edi
    call find_dev
    test %rax, %rax
    jz 1f
    mov %rax, %r15
    call blk_bench
1:  mov $1, %edi
    call find_dev
    test %rax, %rax
    jz 2f
    mov %rax, %r15
    call net_bench
2:  mov $19, %edi
    call find_dev
    test %rax, %rax
    jz 3f
    mov %rax, %r15
    call vsock_bench
3:  PRINT "bench end\n"
    jmp reset

/* ---- block ---- */

blk_bench:
    call dev_init
    xor %edi, %edi
    mov $Q0, %esi
    call queue_setup
    call dev_ok
    mov 0x100(%r15), %eax
    mov %rax, blk_sectors(%rip)
    PRINT "seq start\n"
    movq $65536, blk_len(%rip)
    movq $0, blk_random(%rip)
    mov $SEQ_COUNT, %ebx
    call blk_run
    PRINT "seq done 2048\n"
    PRINT "iops start\n"
    movq $4096, blk_len(%rip)
    movq $1, blk_random(%rip)
    mov $IOPS_COUNT, %ebx
    call blk_run
    PRINT "iops done 8192\n"
    ret

/* blk_run: %ebx requests of blk_len bytes, DEPTH in flight; stops the guest on a bad status. */
blk_run:
    xor %r12d, %r12d                /* next sector (sequential) */
    mov $12345, %r13d               /* LCG state (random) */
    /* fill the queue: request i uses descriptors 2i, 2i+1 */
    xor %r14d, %r14d
1:  mov %r14d, %edi
    call blk_prepare
    mov $Q0, %esi
    mov %r14d, %edi
    shl $1, %edi
    call vq_post
    inc %r14d
    cmp $DEPTH, %r14d
    jne 1b
    mov $Q0, %esi
    call vq_notify
    sub $DEPTH, %ebx
    /* complete one, resubmit it while requests remain */
2:  mov $Q0, %esi
    call vq_wait
    mov %edx, %r14d                 /* head = 2i */
    shr $1, %r14d
    mov %r14d, %eax
    imul $BUFSTRIDE, %eax
    add $BUFS, %eax
    add blk_len(%rip), %rax
    cmpb $0, (%rax)
    jne 4f
    test %ebx, %ebx
    jz 3f
    dec %ebx
    mov %r14d, %edi
    call blk_prepare
    mov $Q0, %esi
    mov %r14d, %edi
    shl $1, %edi
    call vq_kick
3:  movzwl Q0 + 0x30c, %eax         /* last used */
    movzwl Q0 + 0x102, %ecx         /* avail idx */
    cmp %ax, %cx
    jne 2b
    ret
4:  PRINT "bad block status\n"
    jmp reset

/* blk_prepare: writes header and descriptors of request slot %edi for the next sector. */
blk_prepare:
    mov %edi, %ecx
    shl $4, %ecx
    add $HDRS, %ecx                 /* header address */
    movl $0, (%rcx)                 /* VIRTIO_BLK_T_IN */
    movl $0, 4(%rcx)
    cmpq $0, blk_random(%rip)
    je 1f
    imul $1103515245, %r13d, %r13d
    add $12345, %r13d
    mov %r13d, %eax
    shr $8, %eax
    xor %edx, %edx
    mov blk_sectors(%rip), %r8
    shr $3, %r8                     /* 4 KiB blocks on the disk */
    div %r8
    shl $3, %rdx
    mov %rdx, 8(%rcx)
    jmp 2f
1:  mov %r12, 8(%rcx)
    mov blk_len(%rip), %rax
    shr $9, %rax
    add %rax, %r12
    cmp blk_sectors(%rip), %r12
    jb 2f
    xor %r12d, %r12d
2:  mov %edi, %eax
    shl $5, %eax                    /* 2 descriptors of 16 bytes */
    mov %rcx, Q0(%eax)
    movl $16, Q0 + 8(%eax)
    movw $DESC_F_NEXT, Q0 + 12(%eax)
    mov %edi, %edx
    shl $1, %edx
    inc %edx
    mov %dx, Q0 + 14(%eax)
    mov %edi, %edx
    imul $BUFSTRIDE, %edx
    add $BUFS, %edx
    mov %rdx, Q0 + 16(%eax)
    add blk_len(%rip), %rdx
    movb $0xee, (%rdx)              /* status byte, overwritten by the device */
    mov blk_len(%rip), %rdx
    inc %edx
    mov %edx, Q0 + 24(%eax)
    movw $DESC_F_WRITE, Q0 + 28(%eax)
    movw $0, Q0 + 30(%eax)
    ret

/* ---- net ---- */

net_bench:
    call dev_init
    xor %edi, %edi
    mov $Q0, %esi
    call queue_setup
    mov $1, %edi
    mov $Q1, %esi
    call queue_setup
    call dev_ok
    /* one 64-byte frame (12-byte header + 52) shared by all descriptors */
    mov $BUFS, %edi
    xor %eax, %eax
    mov $76, %ecx
    rep stosb
    movl $0xffffffff, BUFS + 12
    movw $0xffff, BUFS + 16
    movw $0xb588, BUFS + 24
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $4, %eax
    movq $BUFS, Q1(%eax)
    movl $76, Q1 + 8(%eax)
    movw $0, Q1 + 12(%eax)
    inc %ecx
    cmp $DEPTH, %ecx
    jne 1b
    PRINT "tx start\n"
    mov $TX_COUNT, %ebx
    xor %r14d, %r14d
2:  mov $Q1, %esi
    mov %r14d, %edi
    call vq_post
    inc %r14d
    cmp $DEPTH, %r14d
    jne 2b
    mov $Q1, %esi
    call vq_notify
    sub $DEPTH, %ebx
3:  mov $Q1, %esi
    call vq_wait
    test %ebx, %ebx
    jz 4f
    dec %ebx
    mov $Q1, %esi
    mov %edx, %edi
    call vq_kick
4:  movzwl Q1 + 0x30c, %eax
    movzwl Q1 + 0x102, %ecx
    cmp %ax, %cx
    jne 3b
    PRINT "tx done 16384\n"
    ret

/* ---- vsock ---- */

vsock_bench:
    call dev_init
    xor %edi, %edi
    mov $Q0, %esi
    call queue_setup
    mov $1, %edi
    mov $Q1, %esi
    call queue_setup
    mov $2, %edi
    mov $Q2, %esi
    call queue_setup
    call dev_ok
    mov 0x100(%r15), %eax
    mov %rax, vs_cid(%rip)
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $4, %eax
    mov %ecx, %edx
    shl $12, %edx
    add $VS_RXBUF, %edx
    mov %rdx, Q0(%eax)
    movl $4096, Q0 + 8(%eax)
    movw $DESC_F_WRITE, Q0 + 12(%eax)
    push %rcx
    mov $Q0, %esi
    mov %ecx, %edi
    call vq_post
    pop %rcx
    inc %ecx
    cmp $8, %ecx
    jne 1b
    mov $Q0, %esi
    call vq_notify
    mov $1, %edi                    /* REQUEST */
    xor %r8d, %r8d
    call vs_send
    mov $2, %edi                    /* RESPONSE */
    call vs_wait
    PRINT "rt start\n"
    mov $RT_COUNT, %ebx
2:  mov $5, %edi                    /* RW, 64 bytes */
    mov $64, %r8d
    call vs_send
    mov $5, %edi
    call vs_wait
    dec %ebx
    jnz 2b
    PRINT "rt done 4096\n"
    ret

/* vs_send: %edi = op, %r8d = payload length; port 2000 -> host port 5001. */
vs_send:
    mov $VS_TXBUF, %ecx
    mov vs_cid(%rip), %rax
    mov %rax, (%rcx)
    movq $2, 8(%rcx)
    movl $2000, 16(%rcx)
    movl $5001, 20(%rcx)
    mov %r8d, 24(%rcx)
    movw $1, 28(%rcx)
    mov %di, 30(%rcx)
    movl $0, 32(%rcx)
    movl $65536, 36(%rcx)
    mov vs_fwd(%rip), %eax
    mov %eax, 40(%rcx)
    movq $VS_TXBUF, Q1
    lea 44(%r8), %eax
    mov %eax, Q1 + 8
    movw $0, Q1 + 12
    mov $Q1, %esi
    xor %edi, %edi
    call vq_kick
    mov $Q1, %esi
    jmp vq_wait

/* vs_wait: %edi = op; waits for a packet with it (skipping credit updates), counts its payload
 * as consumed and gives the buffer back. */
vs_wait:
    mov %edi, %r13d
1:  mov $Q0, %esi
    call vq_wait
    mov %edx, %r12d
    shl $12, %edx
    add $VS_RXBUF, %edx
    movzwl 30(%rdx), %eax
    mov 24(%rdx), %ecx
    add %ecx, vs_fwd(%rip)
    push %rax
    mov $Q0, %esi
    mov %r12d, %edi
    call vq_kick
    pop %rax
    cmp %r13d, %eax
    je 2f
    cmp $6, %eax
    je 1b
    PRINT "unexpected vsock op\n"
    jmp reset
2:  ret

    .data
blk_sectors: .quad 0
blk_len: .quad 0
blk_random: .quad 0
vs_cid: .quad 0
vs_fwd: .long 0
    .text

    .include "virtio_lib.S"
    .include "lib.S"
