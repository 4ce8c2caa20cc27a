/* virtio-net driver test: prints the MAC from the config space, posts four small (2 KiB) RX
 * buffers, sends one Ethernet frame (ethertype 0x88b5, "hello from the guest") on TX, prints
 * "rx ready", then waits for a frame of ethertype 0x88b5 and prints its payload. Other frames
 * (host IPv6 chatter) are skipped and their buffers posted again. */
    .code64
    .include "virtio_defs.S"
    .text
    .globl _start

    .set RXQ, 0x200000
    .set TXQ, 0x201000
    .set RXBUF, 0x300000            /* buffer i at RXBUF + i * 0x1000 */
    .set RXLEN, 2048
    .set TXBUF, 0x310000

_start:
    call net_setup

    PRINT "mac:"
    xor %r12d, %r12d
2:  mov $':', %al
    call putc
    movzbl 0x100(%r15,%r12), %eax
    call put2hex
    inc %r12d
    cmp $6, %r12d
    jne 2b
    PRINT " link="
    movzwl 0x106(%r15), %eax
    call putdec
    PRINT "\n"

    call net_post_rx

    /* the TX frame: zero vnet header, broadcast, our MAC, 0x88b5, payload */
    mov $TXBUF, %edi
    xor %eax, %eax
    mov $12, %ecx
    rep stosb
    mov $0xff, %al
    mov $6, %ecx
    rep stosb
    xor %ecx, %ecx
4:  movzbl 0x100(%r15,%rcx), %eax
    mov %al, (%rdi,%rcx)
    inc %ecx
    cmp $6, %ecx
    jne 4b
    add $6, %rdi
    movw $0xb588, (%rdi)
    add $2, %rdi
    lea payload(%rip), %rsi
    mov $(payload_end - payload), %ecx
    rep movsb
    sub $TXBUF, %edi
    DESC TXQ, 0, TXBUF, 0, 0, 0
    mov %edi, TXQ + 8
    mov $TXQ, %esi
    xor %edi, %edi
    call vq_kick
    mov $TXQ, %esi
    call vq_wait
    PRINT "tx done\n"
    PRINT "rx ready\n"

5:  mov $RXQ, %esi
    call vq_wait
    mov %edx, %r12d                 /* buffer id */
    mov %eax, %r14d                 /* used length */
    mov %r12d, %ebx
    shl $12, %ebx
    add $RXBUF, %ebx
    cmpw $0xb588, 24(%rbx)
    je 6f
    mov $RXQ, %esi
    mov %r12d, %edi
    call vq_kick
    jmp 5b
6:  PRINT "rx: len="
    mov %r14d, %eax
    call putdec
    PRINT " num_buffers="
    movzwl 10(%rbx), %eax
    call putdec
    PRINT " payload="
    lea 26(%rbx), %rsi
    lea -26(%r14), %ecx
    call putn
    PRINT "\n"
    jmp reset

payload: .ascii "hello from the guest"
payload_end:

    .include "virtio_net_lib.S"
    .include "virtio_lib.S"
    .include "lib.S"
