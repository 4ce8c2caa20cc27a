/* Set-up for the virtio-vsock test guests, which set RXQ, TXQ and EVQ (queue blocks). */

/* vsock_setup: %rsi = zero page (as at entry). Finds the first vsock device on the command
 * line (stops the guest without one), keeps its window in %r15 and sets it up with its RX,
 * TX and event queues at RXQ, TXQ and EVQ. */
vsock_setup:
    call virtio_boot
    mov $19, %edi
    call find_dev
    test %rax, %rax
    jnz 1f
    PRINT "no vsock device\n"
    jmp reset
1:  mov %rax, %r15
    call dev_init
    xor %edi, %edi
    mov $RXQ, %esi
    call queue_setup
    mov $1, %edi
    mov $TXQ, %esi
    call queue_setup
    mov $2, %edi
    mov $EVQ, %esi
    call queue_setup
    jmp dev_ok
