/* virtio-blk across a snapshot: sets up the first block device, writes MARKER to sector 1,
 * then forever runs rounds N = 1, 2, ...: writes N to sector 2, reads sectors 1 and 2 back
 * and prints "round N ok" when they hold MARKER and N, else "round N BAD". A guest restored
 * from a snapshot goes on with the next round on the same queue, so wrong ring positions
 * show as a TIMEOUT or a BAD round. */
    .code64
    .include "virtio_defs.S"
    .text
    .globl _start

    .set Q, 0x200000
    .set HDR, 0x210000
    .set STATUS, 0x210100
    .set DATA, 0x211000
    .set DELAY, 20000

_start:
    call blk_setup

    call clear_data
    lea marker(%rip), %rsi
    mov $DATA, %edi
    mov $(marker_end - marker), %ecx
    rep movsb
    mov $1, %edi
    mov $1, %esi
    mov $512, %edx
    xor %ecx, %ecx
    call blk_req
    test %r14d, %r14d
    jnz bad

round:
    incq rounds(%rip)
    call clear_data
    mov rounds(%rip), %rax
    mov %rax, DATA
    mov $1, %edi
    mov $2, %esi
    mov $512, %edx
    xor %ecx, %ecx
    call blk_req
    test %r14d, %r14d
    jnz bad

    call clear_data
    xor %edi, %edi
    mov $1, %esi
    mov $512, %edx
    mov $DESC_F_WRITE, %ecx
    call blk_req
    test %r14d, %r14d
    jnz bad
    lea marker(%rip), %rsi
    mov $DATA, %edi
    mov $(marker_end - marker), %ecx
    repe cmpsb
    jne bad

    call clear_data
    xor %edi, %edi
    mov $2, %esi
    mov $512, %edx
    mov $DESC_F_WRITE, %ecx
    call blk_req
    test %r14d, %r14d
    jnz bad
    mov rounds(%rip), %rax
    cmp %rax, DATA
    jne bad

    PRINT "round "
    mov rounds(%rip), %rax
    call putdec
    PRINT " ok\n"
    mov $DELAY, %ecx
1:  dec %ecx
    jnz 1b
    jmp round

bad:
    PRINT "round "
    mov rounds(%rip), %rax
    call putdec
    PRINT " BAD\n"
    jmp reset

marker: .ascii "marker written before the snapshot"
marker_end:

    .balign 8
rounds: .quad 0

    .include "virtio_blk_lib.S"
    .include "virtio_lib.S"
    .include "lib.S"
