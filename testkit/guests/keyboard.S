/* Waits for key presses on the i8042 (polling its status port, interrupts stay masked), prints
 * each scancode byte in hex, and resets the VM after the 11 bytes of Ctrl+Alt+Del. */
    .code64
    .text
    .globl _start
_start:
    lea ready(%rip), %rsi
    call puts
    mov $11, %ebx
1:  in $0x64, %al           /* status: bit 0 = output buffer full */
    test $1, %al
    jz 1b
    in $0x60, %al           /* the scancode byte */
    call puthex2
    mov $' ', %al
    call putc
    dec %ebx
    jnz 1b
    mov $'\n', %al
    call putc
    jmp reset

/* puthex2: print %al as two hexadecimal digits (clobbers %rax %rcx %rdx). */
puthex2:
    mov %al, %cl
    shr $4, %al
    call hexdigit
    mov %cl, %al
    and $0xf, %al
hexdigit:
    and $0xf, %al
    cmp $10, %al
    jb 2f
    add $('a' - '0' - 10), %al
2:  add $'0', %al
    jmp putc

ready: .asciz "keyboard guest ready\n"

    .include "lib.S"
