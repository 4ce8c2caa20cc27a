/* virtio-net across a snapshot: sets up the network device, posts four RX buffers, then
 * prints "tick N ok" (print_tick) forever, checking the RX queue between ticks: a frame of
 * ethertype 0x88b5 prints "rx: <payload>", other frames (host IPv6 chatter) are skipped; every
 * buffer is posted again. A restored VMM reopens the tap by name and goes on from the same ring positions. */
    .code64
    .include "virtio_defs.S"
    .text
    .globl _start

    .set RXQ, 0x200000
    .set TXQ, 0x201000
    .set RXBUF, 0x300000
    .set RXLEN, 2048

_start:
    call net_setup
    call net_post_rx

tick:
    call print_tick
    mov $RXQ, %esi
    call vq_poll
    cmp $-1, %eax
    je tick
    mov %edx, %r12d                 /* buffer id */
    mov %eax, %r14d                 /* used length */
    mov %r12d, %ebx
    shl $12, %ebx
    add $RXBUF, %ebx
    cmpw $0xb588, 24(%rbx)
    jne 2f
    PRINT "rx: "
    lea 26(%rbx), %rsi
    lea -26(%r14), %ecx
    call putn
    PRINT "\n"
2:  mov $RXQ, %esi
    mov %r12d, %edi
    call vq_kick
    jmp tick

    .include "virtio_net_lib.S"
    .include "virtio_lib.S"
    .include "lib.S"
