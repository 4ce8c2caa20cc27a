/* virtio-vsock across a snapshot: sets up the vsock device, posts four RX buffers and one
 * 8-byte event buffer (filled with 0xff), then prints "tick N ok" (print_tick) forever,
 * checking the event queue between ticks. When the device uses the event buffer it prints
 * "transport reset: id=I len=L" once: a restored VMM sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
 * (id 0, 4 bytes). It takes the reset one tick later, as a driver does in a work item of its
 * own: prints "reset taken", gives the event buffer back and notifies the event queue. From
 * the reset on it prints every packet the device puts in an RX buffer, "rx: op=O port=P"
 * (P its destination port), and gives the buffer back. */
    .code64
    .include "virtio_defs.S"
    .text
    .globl _start

    .set RXQ, 0x200000
    .set TXQ, 0x201000
    .set EVQ, 0x202000
    .set EVBUF, 0x300000
    .set RXBUF, 0x310000            /* buffer i at RXBUF + i * 0x1000 */
    .set RXLEN, 4096

_start:
    call vsock_setup
    mov $RXQ, %esi
    mov $4, %edi
    mov $RXBUF, %edx
    mov $RXLEN, %ecx
    call vq_fill
    movq $-1, EVBUF
    DESC EVQ, 0, EVBUF, 8, DESC_F_WRITE, 0
    xor %edi, %edi
    mov $EVQ, %esi
    call vq_kick

tick:
    call print_tick
    mov $EVQ, %esi
    call vq_poll
    cmp $-1, %eax
    je tick
    mov %eax, %r12d
    PRINT "transport reset: id="
    mov EVBUF, %eax
    call putdec
    PRINT " len="
    mov %r12d, %eax
    call putdec
    PRINT "\n"
    call rx_print
    call print_tick
    call rx_print
    PRINT "reset taken\n"
    movq $-1, EVBUF
    xor %edi, %edi
    mov $EVQ, %esi
    call vq_kick
2:  call print_tick
    call rx_print
    jmp 2b

/* rx_print: prints each packet waiting in an RX buffer and gives the buffer back. */
rx_print:
    push %rbx
1:  mov $RXQ, %esi
    call vq_poll
    cmp $-1, %eax
    je 2f
    mov %edx, %ebx
    shl $12, %ebx
    add $RXBUF, %ebx
    push %rdx
    PRINT "rx: op="
    movzwl 30(%rbx), %eax
    call putdec
    PRINT " port="
    mov 20(%rbx), %eax
    call putdec
    PRINT "\n"
    pop %rdi
    mov $RXQ, %esi
    call vq_kick
    jmp 1b
2:  pop %rbx
    ret

    .include "virtio_vsock_lib.S"
    .include "virtio_lib.S"
    .include "lib.S"
