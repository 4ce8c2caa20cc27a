/* Echoes every byte received on COM1 back to COM1 (polling the line status register), and
 * resets the VM after echoing a 'q'. */
    .code64
    .text
    .globl _start
_start:
    lea ready(%rip), %rsi
    call puts
1:  mov $0x3fd, %dx         /* line status: bit 0 = data ready */
    in %dx, %al
    test $1, %al
    jz 1b
    mov $0x3f8, %dx
    in %dx, %al
    out %al, %dx
    cmp $'q', %al
    jne 1b
    jmp reset

ready: .asciz "echo guest ready\n"

    .include "lib.S"
