/* virtio-balloon driver test (free page reporting): finds the balloon, accepts its features and
 * sets up its three queues (inflate, deflate, reporting at index 2), then fills two pages with
 * 0xa5 and prints, for each report it makes on the reporting queue, the used length and the
 * first byte of both pages after the device answered: a reported page reads 00 (its host page
 * was dropped), the other keeps a5; a range that is not whole pages is answered and drops
 * nothing. Also prints the config space (num_pages, then actual after the driver wrote 7). */
    .code64
    .include "virtio_defs.S"
    .text
    .globl _start

    .set INFLATEQ, 0x200000
    .set DEFLATEQ, 0x201000
    .set REPORTQ, 0x202000
    .set PAGE_A, 0x400000
    .set PAGE_B, 0x401000

_start:
    call virtio_boot
    mov $5, %edi
    call find_dev
    test %rax, %rax
    jnz 1f
    PRINT "no balloon\n"
    jmp reset
1:  mov %rax, %r15
    PRINT "features: "
    movl $0, 0x14(%r15)
    mov 0x10(%r15), %eax
    call puthex
    PRINT "\n"
    call dev_init
    xor %edi, %edi
    mov $INFLATEQ, %esi
    call queue_setup
    mov $1, %edi
    mov $DEFLATEQ, %esi
    call queue_setup
    mov $2, %edi
    mov $REPORTQ, %esi
    call queue_setup
    call dev_ok
    PRINT "num_pages="
    mov 0x100(%r15), %eax
    call putdec
    movl $7, 0x104(%r15)
    PRINT " actual="
    mov 0x104(%r15), %eax
    call putdec
    PRINT "\n"

    call fill
    /* one whole page: dropped */
    DESC REPORTQ, 0, PAGE_A, 4096, DESC_F_WRITE, 0
    PRINT "page: "
    call report

    call fill
    /* half a page: kept */
    DESC REPORTQ, 0, PAGE_A, 2048, DESC_F_WRITE, 0
    PRINT "half page: "
    call report
    jmp reset

/* fill: writes 0xa5 over PAGE_A and PAGE_B. */
fill:
    mov $PAGE_A, %edi
    mov $0xa5, %eax
    mov $8192, %ecx
    rep stosb
    ret

/* report: makes descriptor 0 of the reporting queue available, waits for the device, prints
 * "len=N a=XX b=XX" (the used length and the first byte of each page). */
report:
    mov $REPORTQ, %esi
    xor %edi, %edi
    call vq_kick
    mov $REPORTQ, %esi
    call vq_wait
    push %rax
    PRINT "len="
    pop %rax
    call putdec
    PRINT " a="
    movzbl PAGE_A, %eax
    call put2hex
    PRINT " b="
    movzbl PAGE_B, %eax
    call put2hex
    PRINT "\n"
    ret

    .include "virtio_lib.S"
    .include "lib.S"
