/* virtio-vsock across a snapshot: sets up the vsock device, posts one 8-byte event buffer
 * (filled with 0xff) and then prints "tick N ok" (print_tick) forever, checking the event
 * queue between ticks. When the device uses the buffer it prints "transport reset: id=I
 * len=L" once: a restored VMM sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (id 0, 4 bytes). */
    .code64
    .include "virtio_defs.S"
    .text
    .globl _start

    .set RXQ, 0x200000
    .set TXQ, 0x201000
    .set EVQ, 0x202000
    .set EVBUF, 0x300000

_start:
    call vsock_setup
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
    jmp tick

    .include "virtio_vsock_lib.S"
    .include "virtio_lib.S"
    .include "lib.S"
