/* Set-up for the virtio-net test guests, which set RXQ and TXQ (queue blocks), RXBUF (RX
 * buffer i at RXBUF + i * 0x1000) and RXLEN. */

/* net_setup: %rsi = zero page (as at entry). Finds the first network device on the command
 * line (stops the guest without one), keeps its window in %r15 and sets it up with its RX and
 * TX queues at RXQ and TXQ. */
net_setup:
    call virtio_boot
    mov $1, %edi
    call find_dev
    test %rax, %rax
    jnz 1f
    PRINT "no network device\n"
    jmp reset
1:  mov %rax, %r15
    call dev_init
    xor %edi, %edi
    mov $RXQ, %esi
    call queue_setup
    mov $1, %edi
    mov $TXQ, %esi
    call queue_setup
    jmp dev_ok

/* net_post_rx: posts four RX buffers, one descriptor each, and notifies the device. */
net_post_rx:
    mov $RXQ, %esi
    mov $4, %edi
    mov $RXBUF, %edx
    mov $RXLEN, %ecx
    jmp vq_fill
