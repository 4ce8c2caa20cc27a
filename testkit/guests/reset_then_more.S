/* Pulses the reset line, then would go on: print, and triple-fault (ud2 with no IDT). The VMM
 * must stop the vCPU at the reset: nothing after it may run. */
    .code64
    .text
    .globl _start
_start:
    lea before(%rip), %rsi
    call puts
    mov $0xfe, %al
    out %al, $0x64
    lea after(%rip), %rsi
    call puts
    ud2

before: .asciz "before the reset\n"
after: .asciz "after the reset\n"

    .include "lib.S"
