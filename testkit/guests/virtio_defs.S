/* Constants and macros of the test guests' virtio driver (virtio_lib.S); include first. */
    .set VIRTIO_STATUS, 0x70
    .set QSIZE, 16
    .set DESC_F_NEXT, 1
    .set DESC_F_WRITE, 2

/* PRINT "text": prints a string literal (clobbers like puts). */
.macro PRINT str
    .pushsection .rodata
990: .asciz "\str"
    .popsection
    lea 990b(%rip), %rsi
    call puts
.endm

/* DESC q, i, addr, len, flags, next: writes descriptor i of queue block q (all immediates). */
.macro DESC q, i, addr, len, flags, next
    movq $\addr, \q + \i * 16
    movl $\len, \q + \i * 16 + 8
    movw $\flags, \q + \i * 16 + 12
    movw $\next, \q + \i * 16 + 14
.endm

