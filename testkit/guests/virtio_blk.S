/* virtio-blk driver test: finds the first block device on the command line and runs a fixed
 * sequence of requests, printing each status byte (00 OK, 01 IOERR, 02 UNSUPP) and data:
 * read sector 0, GET_ID, write sector 1 and read it back, reads past and across the end of the
 * disk, FLUSH, an unknown request type, a looping chain, a data buffer outside guest RAM, a
 * read proving the device still works, and a read after a device reset and re-activation. */
    .code64
    .include "virtio_defs.S"
    .text
    .globl _start

    .set Q, 0x200000
    .set HDR, 0x210000
    .set STATUS, 0x210100
    .set DATA, 0x211000

_start:
    call blk_setup

    PRINT "capacity: "
    mov 0x100(%r15), %eax
    mov %rax, %r12                  /* capacity in sectors (small disks) */
    call putdec
    PRINT " features: "
    movl $0, 0x14(%r15)
    mov 0x10(%r15), %eax
    call puthex
    PRINT "\n"

    /* read sector 0 */
    xor %edi, %edi
    xor %esi, %esi
    mov $512, %edx
    mov $DESC_F_WRITE, %ecx
    call blk_req
    PRINT "read0: "
    call show_status
    PRINT " data="
    mov $DATA, %esi
    mov $64, %ecx
    call putn
    PRINT "\n"

    /* GET_ID */
    mov $8, %edi
    xor %esi, %esi
    mov $20, %edx
    mov $DESC_F_WRITE, %ecx
    call blk_req
    PRINT "id: "
    call show_status
    PRINT " id="
    mov $DATA, %esi
    mov $20, %ecx
    call putn
    PRINT "\n"

    /* write sector 1 */
    call clear_data
    lea written(%rip), %rsi
    mov $DATA, %edi
    mov $(written_end - written), %ecx
    rep movsb
    mov $1, %edi
    mov $1, %esi
    mov $512, %edx
    xor %ecx, %ecx
    call blk_req
    PRINT "write1: "
    call show_status
    PRINT "\n"

    /* read it back */
    call clear_data
    xor %edi, %edi
    mov $1, %esi
    mov $512, %edx
    mov $DESC_F_WRITE, %ecx
    call blk_req
    PRINT "read1: "
    call show_status
    PRINT " data="
    mov $DATA, %esi
    mov $64, %ecx
    call putn
    PRINT "\n"

    /* read at the capacity: past the end */
    xor %edi, %edi
    mov %r12, %rsi
    mov $512, %edx
    mov $DESC_F_WRITE, %ecx
    call blk_req
    PRINT "past-end: "
    call show_status
    PRINT "\n"

    /* two sectors from the last one: across the end */
    xor %edi, %edi
    lea -1(%r12), %rsi
    mov $1024, %edx
    mov $DESC_F_WRITE, %ecx
    call blk_req
    PRINT "across-end: "
    call show_status
    PRINT "\n"

    /* FLUSH */
    mov $4, %edi
    xor %esi, %esi
    xor %edx, %edx
    call blk_req
    PRINT "flush: "
    call show_status
    PRINT "\n"

    /* unknown request type */
    mov $0x42, %edi
    xor %esi, %esi
    xor %edx, %edx
    call blk_req
    PRINT "unknown: "
    call show_status
    PRINT "\n"

    /* a chain that loops: header -> status -> header -> ... */
    movl $0, HDR
    movq $0, HDR + 8
    movb $0xee, STATUS
    DESC Q, 0, HDR, 16, DESC_F_NEXT, 1
    DESC Q, 1, STATUS, 1, (DESC_F_NEXT | DESC_F_WRITE), 0
    call submit
    PRINT "loop: "
    call show_status
    PRINT "\n"

    /* a data buffer outside guest RAM */
    movl $0, HDR
    movq $0, HDR + 8
    movb $0xee, STATUS
    DESC Q, 0, HDR, 16, DESC_F_NEXT, 1
    DESC Q, 1, 0x7fff0000, 512, (DESC_F_NEXT | DESC_F_WRITE), 2
    DESC Q, 2, STATUS, 1, DESC_F_WRITE, 0
    call submit
    PRINT "outside-ram: "
    call show_status
    PRINT "\n"

    /* the device still works */
    xor %edi, %edi
    xor %esi, %esi
    mov $512, %edx
    mov $DESC_F_WRITE, %ecx
    call blk_req
    PRINT "after: "
    call show_status
    PRINT "\n"

    /* reset the device, set it up again on a fresh ring and read once more */
    call dev_init
    mov $Q, %edi
    xor %eax, %eax
    mov $0x400, %ecx
    rep stosb
    xor %edi, %edi
    mov $Q, %esi
    call queue_setup
    call dev_ok
    xor %edi, %edi
    xor %esi, %esi
    mov $512, %edx
    mov $DESC_F_WRITE, %ecx
    call blk_req
    PRINT "reactivated: "
    call show_status
    PRINT " data="
    mov $DATA, %esi
    mov $64, %ecx
    call putn
    PRINT "\n"
    jmp reset

written: .ascii "written by the guest"
written_end:

    .include "virtio_blk_lib.S"
    .include "virtio_lib.S"
    .include "lib.S"
