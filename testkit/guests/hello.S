/* Prints a greeting on the serial console, then resets the VM. */
    .code64
    .text
    .globl _start
_start:
    lea msg(%rip), %rsi
    call puts
    jmp reset

msg: .asciz "Hello from the mvm test guest\n"

    .include "lib.S"
