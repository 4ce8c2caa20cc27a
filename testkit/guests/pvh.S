/* Boots through the PVH entry (32-bit protected mode, EBX = hvm_start_info): checks the magic,
 * prints the command line, resets. The ELF note below makes the VMM choose PVH. */
    .section .note.Xen, "a"
    .align 4
    .long 4                 /* name size */
    .long 4                 /* desc size */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start
    .align 4

    .code32
    .text
    .globl _start
_start:                     /* 64-bit entry: never used when PVH is honoured */
    jmp fail32
pvh_start:
    mov $0x8ff0, %esp       /* PVH gives no stack */
    cmpl $0x336ec578, (%ebx)
    jne fail32
    mov $msg, %esi
    call puts32
    mov 24(%ebx), %esi      /* cmdline_paddr (low 32 bits) */
    call puts32
    mov $nl, %esi
    call puts32
    mov $0xfe, %al
    out %al, $0x64
1:  hlt
    jmp 1b
fail32:
    mov $bad, %esi
    call puts32
    mov $0xfe, %al
    out %al, $0x64
    jmp 1b
puts32:
    mov $0x3f8, %dx
2:  lodsb
    test %al, %al
    jz 3f
    out %al, %dx
    jmp 2b
3:  ret

msg: .asciz "PVH boot ok, cmdline: "
bad: .asciz "PVH boot FAILED\n"
nl:  .asciz "\n"
