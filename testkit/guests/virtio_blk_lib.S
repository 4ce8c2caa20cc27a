/* Set-up and requests on one queue for the virtio-blk test guests, which set Q (queue
 * block), HDR (request header), STATUS (status byte) and DATA (data buffer). */

/* blk_setup: %rsi = zero page (as at entry). Finds the first block device on the command
 * line (stops the guest without one), keeps its window in %r15, sets it up with queue 0 at Q. */
blk_setup:
    call virtio_boot
    mov $2, %edi
    call find_dev
    test %rax, %rax
    jnz 1f
    PRINT "no block device\n"
    jmp reset
1:  mov %rax, %r15
    call dev_init
    xor %edi, %edi
    mov $Q, %esi
    call queue_setup
    jmp dev_ok

/* blk_req: %edi = type, %rsi = sector, %edx = data length (0: no data buffer),
 * %ecx = data buffer flags → %r14d = status byte, %r13d = used length. */
blk_req:
    mov %edi, HDR
    movl $0, HDR + 4
    mov %rsi, HDR + 8
    movb $0xee, STATUS
    DESC Q, 0, HDR, 16, DESC_F_NEXT, 1
    test %edx, %edx
    jz 1f
    movq $DATA, Q + 16
    mov %edx, Q + 24
    or $DESC_F_NEXT, %ecx
    mov %cx, Q + 28
    movw $2, Q + 30
    DESC Q, 2, STATUS, 1, DESC_F_WRITE, 0
    jmp submit
1:  DESC Q, 1, STATUS, 1, DESC_F_WRITE, 0
    /* fall through */

/* submit: makes descriptor 0 available, waits for it → %r14d = status byte, %r13d = used len. */
submit:
    mov $Q, %esi
    xor %edi, %edi
    call vq_kick
    mov $Q, %esi
    call vq_wait
    mov %eax, %r13d
    movzbl STATUS, %r14d
    ret

/* show_status: prints "status=XX len=N" from %r14d and %r13d. */
show_status:
    PRINT "status="
    mov %r14d, %eax
    call put2hex
    PRINT " len="
    mov %r13d, %eax
    jmp putdec

clear_data:
    mov $DATA, %edi
    xor %eax, %eax
    mov $512, %ecx
    rep stosb
    ret
