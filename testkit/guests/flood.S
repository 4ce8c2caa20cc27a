/* Floods the serial console: a banner, LINES numbered lines of 15 bytes ("flood 0000abcd"),
 * a last line, then resets the VM. */
    .code64
    .text
    .globl _start
    .set LINES, 20480
_start:
    lea banner(%rip), %rsi
    call puts
    xor %ebx, %ebx
1:  lea prefix(%rip), %rsi
    call puts
    mov %rbx, %rax
    call puthex
    mov $'\n', %al
    call putc
    inc %ebx
    cmp $LINES, %ebx
    jb 1b
    lea last(%rip), %rsi
    call puts
    jmp reset

banner: .asciz "flood guest: start\n"
prefix: .asciz "flood "
last:   .asciz "flood guest: done\n"

    .include "lib.S"
