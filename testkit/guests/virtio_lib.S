/* A minimal virtio-mmio (version 2) split-queue driver for test guests.
 *
 * Devices are found from the `virtio_mmio.device=4K@0x<base>:<irq>` entries of the kernel
 * command line (zero page). A queue lives in one 4 KiB "queue block" at a fixed guest address:
 *   +0x000 descriptor table (16 entries)   +0x100 available ring   +0x200 used ring
 *   +0x300 MMIO base of its device (u64)   +0x308 queue index (u32) +0x30c last used index (u16)
 * Every queue has 16 entries. Completion is polled from the used ring (interrupts stay masked).
 *
 * Macros and constants are in virtio_defs.S, included at the top of a guest.
 * Conventions: %r15 holds the current device's MMIO base. Routines clobber %rax %rcx %rdx %rsi
 * %rdi %r8 %r9 unless stated; %rbx %r12-%r15 are preserved. */

    .text

/* virtio_boot: remember the command line; %rsi = zero page (as at entry). */
virtio_boot:
    mov 0x228(%rsi), %eax
    mov %rax, cmdline_ptr(%rip)
    ret

/* next_mmio: %rdi = command line cursor → %rax = next device window base (0 at the end),
 * %rdi advanced past it. */
next_mmio:
1:  movzbl (%rdi), %eax
    test %al, %al
    jz 9f
    cmp $'@', %al
    jne 2f
    cmpb $'0', 1(%rdi)
    jne 2f
    cmpb $'x', 2(%rdi)
    jne 2f
    add $3, %rdi
    xor %eax, %eax
3:  movzbl (%rdi), %ecx
    sub $'0', %ecx
    cmp $9, %ecx
    jbe 4f
    movzbl (%rdi), %ecx
    sub $'a', %ecx
    cmp $5, %ecx
    ja 5f
    add $10, %ecx
4:  shl $4, %rax
    or %rcx, %rax
    inc %rdi
    jmp 3b
5:  ret
2:  inc %rdi
    jmp 1b
9:  xor %eax, %eax
    ret

/* find_dev: %edi = virtio device id → %rax = MMIO base of the first such device, 0 if none. */
find_dev:
    push %rbx
    mov %edi, %ebx
    mov cmdline_ptr(%rip), %rdi
1:  call next_mmio
    test %rax, %rax
    jz 2f
    cmpl $0x74726976, (%rax)
    jne 1b
    cmp %ebx, 8(%rax)
    jne 1b
2:  pop %rbx
    ret

/* dev_init: reset the device at %r15, acknowledge it and accept every feature it offers in
 * the low word plus VIRTIO_F_VERSION_1; stops the guest if FEATURES_OK does not stick. */
dev_init:
    movl $0, VIRTIO_STATUS(%r15)
    movl $1, VIRTIO_STATUS(%r15)
    movl $3, VIRTIO_STATUS(%r15)
    movl $0, 0x14(%r15)
    mov 0x10(%r15), %eax
    movl $0, 0x24(%r15)
    mov %eax, 0x20(%r15)
    movl $1, 0x24(%r15)
    movl $1, 0x20(%r15)
    movl $11, VIRTIO_STATUS(%r15)
    testl $8, VIRTIO_STATUS(%r15)
    jnz 1f
    PRINT "FEATURES_OK refused\n"
    jmp reset
1:  ret

/* queue_setup: %edi = queue index, %rsi = queue block → queue configured and ready. */
queue_setup:
    mov %edi, 0x30(%r15)
    movl $QSIZE, 0x38(%r15)
    mov %esi, 0x80(%r15)
    movl $0, 0x84(%r15)
    lea 0x100(%rsi), %rax
    mov %eax, 0x90(%r15)
    movl $0, 0x94(%r15)
    lea 0x200(%rsi), %rax
    mov %eax, 0xa0(%r15)
    movl $0, 0xa4(%r15)
    movl $1, 0x44(%r15)
    mov %r15, 0x300(%rsi)
    mov %edi, 0x308(%rsi)
    movw $0, 0x30c(%rsi)
    ret

/* dev_ok: sets DRIVER_OK; stops the guest if the device asks for a reset. */
dev_ok:
    movl $15, VIRTIO_STATUS(%r15)
    testl $0x40, VIRTIO_STATUS(%r15)
    jz 1f
    PRINT "DEVICE_NEEDS_RESET\n"
    jmp reset
1:  ret

/* vq_post: %rsi = queue block, %edi = head descriptor → made available (no notification). */
vq_post:
    movzwl 0x102(%rsi), %eax
    mov %eax, %ecx
    and $(QSIZE - 1), %ecx
    mov %di, 0x104(%rsi,%rcx,2)
    inc %eax
    mov %ax, 0x102(%rsi)
    ret

/* vq_fill: %rsi = queue block, %edi = count, %rdx = first buffer, %ecx = bytes each →
 * descriptors 0 to count - 1 point at device-writable buffers (buffer i at %rdx + i * 0x1000),
 * made available, and the device notified: the receive queues of the test guests. */
vq_fill:
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    mov %rsi, %rbx
    mov %edi, %r13d
    mov %rdx, %r14
    mov %ecx, %ebp
    xor %r12d, %r12d
1:  mov %r12d, %eax
    shl $4, %eax
    mov %r12d, %ecx
    shl $12, %ecx
    add %r14, %rcx
    mov %rcx, (%rbx,%rax)
    mov %ebp, 8(%rbx,%rax)
    movw $DESC_F_WRITE, 12(%rbx,%rax)
    movw $0, 14(%rbx,%rax)
    mov %rbx, %rsi
    mov %r12d, %edi
    call vq_post
    inc %r12d
    cmp %r13d, %r12d
    jne 1b
    mov %rbx, %rsi
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    jmp vq_notify

/* vq_notify: %rsi = queue block → QueueNotify written. */
vq_notify:
    mov 0x300(%rsi), %rcx
    mov 0x308(%rsi), %eax
    mov %eax, 0x50(%rcx)
    ret

/* vq_kick: vq_post then vq_notify. */
vq_kick:
    call vq_post
    jmp vq_notify

/* vq_poll: %rsi = queue block → %eax = used length and %edx = head id of the next used
 * element, or %eax = -1 when there is none. */
vq_poll:
    movzwl 0x202(%rsi), %eax
    cmp 0x30c(%rsi), %ax
    jne 1f
    mov $-1, %eax
    ret
1:  movzwl 0x30c(%rsi), %ecx
    and $(QSIZE - 1), %ecx
    mov 0x204(%rsi,%rcx,8), %edx
    mov 0x208(%rsi,%rcx,8), %eax
    incw 0x30c(%rsi)
    ret

/* vq_wait: like vq_poll but waits (and stops the guest with "TIMEOUT" after a long while). */
vq_wait:
    mov $50000000, %r9d
1:  call vq_poll
    cmp $-1, %eax
    jne 2f
    dec %r9d
    jnz 1b
    PRINT "TIMEOUT waiting for the used ring\n"
    jmp reset
2:  ret

/* put2hex: prints %al as two hexadecimal digits. */
put2hex:
    push %rax
    shr $4, %al
    call 1f
    pop %rax
1:  and $0xf, %al
    cmp $10, %al
    jb 2f
    add $('a' - '0' - 10), %al
2:  add $'0', %al
    jmp putc

/* putn: prints at most %ecx bytes from %rsi, stopping at a NUL or a newline. */
putn:
    test %ecx, %ecx
    jz 2f
    mov (%rsi), %al
    test %al, %al
    jz 2f
    cmp $'\n', %al
    je 2f
    push %rcx
    call putc
    pop %rcx
    inc %rsi
    dec %ecx
    jmp putn
2:  ret

/* print_tick: counts a tick, prints "tick N ok" and waits a little: the pace of the guests
 * that run across a snapshot while checking a queue between ticks. */
print_tick:
    incq ticks(%rip)
    PRINT "tick "
    mov ticks(%rip), %rax
    call putdec
    PRINT " ok\n"
    mov $20000, %ecx
1:  dec %ecx
    jnz 1b
    ret

    .data
cmdline_ptr: .quad 0
ticks: .quad 0
    .text
