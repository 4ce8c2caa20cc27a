/* Prints a dot roughly every 100k loop iterations forever, for pause/resume and signal tests. */
    .code64
    .text
    .globl _start
_start:
    mov $'.', %al
    mov $0x3f8, %dx
    out %al, %dx
    mov $100000, %ecx
1:  dec %ecx
    jnz 1b
    jmp _start
