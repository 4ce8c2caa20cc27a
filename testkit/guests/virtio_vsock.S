/* virtio-vsock driver test, guest CID from the config space. In order:
 *  g2h: connects to host port 5000, sends "ping from guest\n", prints the reply;
 *  h2g: waits for a host-initiated REQUEST, accepts it, prints the data and echoes it back;
 *  refused: a REQUEST to port 7777 (nobody listens) must get RST;
 *  unknown: data for a connection that does not exist must get RST;
 *  g2h close: SHUTDOWN (both directions) must be confirmed with RST.
 * CREDIT_UPDATE packets are skipped; anything else unexpected is printed. */
    .code64
    .include "virtio_defs.S"
    .text
    .globl _start

    .set RXQ, 0x200000
    .set TXQ, 0x201000
    .set EVQ, 0x202000
    .set RXBUF, 0x300000            /* buffer i at RXBUF + i * 0x1000 */
    .set RXLEN, 4096
    .set TXBUF, 0x310000
    .set ECHOBUF, 0x320000
    .set OP_REQUEST, 1
    .set OP_RESPONSE, 2
    .set OP_RST, 3
    .set OP_SHUTDOWN, 4
    .set OP_RW, 5

_start:
    call vsock_setup

    PRINT "cid: "
    mov 0x100(%r15), %eax
    mov %rax, guest_cid(%rip)
    call putdec
    PRINT "\n"

    mov $RXQ, %esi
    mov $8, %edi
    mov $RXBUF, %edx
    mov $RXLEN, %ecx
    call vq_fill

    /* guest -> host */
    mov $OP_REQUEST, %edi
    mov $1234, %esi
    mov $5000, %edx
    xor %ecx, %ecx
    xor %r8d, %r8d
    xor %r9d, %r9d
    call tx_send
    mov $OP_RESPONSE, %edi
    call rx_wait
    PRINT "g2h: connected\n"
    call rx_repost
    mov $OP_RW, %edi
    mov $1234, %esi
    mov $5000, %edx
    lea ping(%rip), %rcx
    mov $(ping_end - ping), %r8d
    xor %r9d, %r9d
    call tx_send
    mov $OP_RW, %edi
    call rx_wait
    PRINT "g2h: got "
    lea 44(%rbx), %rsi
    mov 24(%rbx), %ecx
    call putn
    PRINT "\n"
    call rx_repost

    /* host -> guest */
    PRINT "h2g: listening\n"
    mov $OP_REQUEST, %edi
    call rx_wait
    PRINT "h2g: request for port "
    mov 20(%rbx), %eax
    mov %eax, local_port(%rip)
    call putdec
    PRINT "\n"
    mov 16(%rbx), %eax
    mov %eax, peer_port(%rip)
    call rx_repost
    mov $OP_RESPONSE, %edi
    mov local_port(%rip), %esi
    mov peer_port(%rip), %edx
    xor %ecx, %ecx
    xor %r8d, %r8d
    xor %r9d, %r9d
    call tx_send
    mov $OP_RW, %edi
    call rx_wait
    PRINT "h2g: got "
    lea 44(%rbx), %rsi
    mov 24(%rbx), %ecx
    call putn
    PRINT "\n"
    mov 24(%rbx), %ecx
    mov %ecx, %r14d
    lea 44(%rbx), %rsi
    mov $ECHOBUF, %edi
    rep movsb
    call rx_repost
    mov $OP_RW, %edi
    mov local_port(%rip), %esi
    mov peer_port(%rip), %edx
    mov $ECHOBUF, %ecx
    mov %r14d, %r8d
    xor %r9d, %r9d
    call tx_send

    /* nobody listens on 7777 */
    mov $OP_REQUEST, %edi
    mov $1235, %esi
    mov $7777, %edx
    xor %ecx, %ecx
    xor %r8d, %r8d
    xor %r9d, %r9d
    call tx_send
    mov $OP_RST, %edi
    call rx_wait
    PRINT "refused: rst from port "
    mov 16(%rbx), %eax
    call putdec
    PRINT "\n"
    call rx_repost

    /* data for a connection that does not exist */
    mov $OP_RW, %edi
    mov $4321, %esi
    mov $8888, %edx
    lea ping(%rip), %rcx
    mov $1, %r8d
    xor %r9d, %r9d
    call tx_send
    mov $OP_RST, %edi
    call rx_wait
    PRINT "unknown: rst from port "
    mov 16(%rbx), %eax
    call putdec
    PRINT "\n"
    call rx_repost

    /* close guest -> host */
    mov $OP_SHUTDOWN, %edi
    mov $1234, %esi
    mov $5000, %edx
    xor %ecx, %ecx
    xor %r8d, %r8d
    mov $3, %r9d
    call tx_send
    mov $OP_RST, %edi
    call rx_wait
    PRINT "g2h: closed\n"
    call rx_repost
    PRINT "done\n"
    jmp reset

/* tx_send: %edi = op, %esi = source port, %edx = destination port (host CID 2), %rcx = payload,
 * %r8d = payload length, %r9d = flags. Waits until the device used the packet. */
tx_send:
    push %rbx
    mov $TXBUF, %ebx
    mov guest_cid(%rip), %rax
    mov %rax, 0(%rbx)
    movq $2, 8(%rbx)
    mov %esi, 16(%rbx)
    mov %edx, 20(%rbx)
    mov %r8d, 24(%rbx)
    movw $1, 28(%rbx)
    mov %di, 30(%rbx)
    mov %r9d, 32(%rbx)
    movl $65536, 36(%rbx)
    movl $0, 40(%rbx)
    mov %rcx, %rsi
    lea 44(%rbx), %rdi
    mov %r8d, %ecx
    rep movsb
    movq $TXBUF, TXQ
    lea 44(%r8), %eax
    mov %eax, TXQ + 8
    movw $0, TXQ + 12
    mov $TXQ, %esi
    xor %edi, %edi
    call vq_kick
    mov $TXQ, %esi
    call vq_wait
    pop %rbx
    ret

/* rx_wait: %edi = operation → %rbx = buffer holding the next packet with that operation,
 * %r12d = its descriptor (give it back with rx_repost). */
rx_wait:
    mov %edi, %r13d
1:  mov $RXQ, %esi
    call vq_wait
    mov %edx, %r12d
    mov %edx, %ebx
    shl $12, %ebx
    add $RXBUF, %ebx
    movzwl 30(%rbx), %eax
    cmp %r13d, %eax
    je 3f
    cmp $6, %eax
    je 2f
    PRINT "unexpected op="
    movzwl 30(%rbx), %eax
    call putdec
    PRINT "\n"
2:  call rx_repost
    jmp 1b
3:  ret

rx_repost:
    mov $RXQ, %esi
    mov %r12d, %edi
    jmp vq_kick

ping: .ascii "ping from guest\n"
ping_end:

    .data
guest_cid: .quad 0
peer_port: .long 0
local_port: .long 0
    .text

    .include "virtio_vsock_lib.S"
    .include "virtio_lib.S"
    .include "lib.S"
