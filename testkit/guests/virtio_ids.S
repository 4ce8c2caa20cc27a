/* Walks the virtio_mmio.device= entries of the command line and prints the identity registers
 * of every window: magic, version, device id, vendor id and the offered feature words. */
    .code64
    .include "virtio_defs.S"
    .text
    .globl _start
_start:
    call virtio_boot
    mov cmdline_ptr(%rip), %r12
1:  mov %r12, %rdi
    call next_mmio
    mov %rdi, %r12
    test %rax, %rax
    jz 2f
    mov %rax, %r15
    PRINT "window "
    mov %r15, %rax
    call puthex
    PRINT ": magic="
    mov 0x00(%r15), %eax
    call puthex
    PRINT " version="
    mov 0x04(%r15), %eax
    call putdec
    PRINT " device="
    mov 0x08(%r15), %eax
    call putdec
    PRINT " vendor="
    mov 0x0c(%r15), %eax
    call puthex
    PRINT " features="
    movl $1, 0x14(%r15)
    mov 0x10(%r15), %eax
    call puthex
    movl $0, 0x14(%r15)
    mov 0x10(%r15), %eax
    call puthex
    PRINT "\n"
    jmp 1b
2:  PRINT "end\n"
    jmp reset

    .include "virtio_lib.S"
    .include "lib.S"
