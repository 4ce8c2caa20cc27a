/* Counts in memory and stamps progress on the serial port, for snapshot tests. At start it
 * fills STAMP_QWORDS qwords at STAMP with a pattern; then it increments `counter` forever and,
 * every STEP increments, increments `lines` and prints "count <lines> ok" when the pattern is
 * intact and counter == lines * STEP, else "count <lines> BAD". A guest restored from a
 * snapshot goes on from the snapshot's line with the same memory. */
    .code64
    .text
    .globl _start

    .set STAMP, 0x200000
    .set STAMP_QWORDS, 2048
    .set STEP, 20000
    .set GOLDEN, 0x9e3779b97f4a7c15

_start:
    mov $STAMP, %rdi
    xor %ecx, %ecx
    xor %eax, %eax
    movabs $GOLDEN, %r9
1:  mov %rax, (%rdi,%rcx,8)
    add %r9, %rax
    inc %ecx
    cmp $STAMP_QWORDS, %ecx
    jne 1b
    movq $STEP, left(%rip)

count:
    incq counter(%rip)
    decq left(%rip)
    jnz count
    movq $STEP, left(%rip)
    incq lines(%rip)
    lea msg(%rip), %rsi
    call puts
    mov lines(%rip), %rax
    call putdec
    call check
    call puts
    jmp count

/* check: %rsi = " ok\n" when the stamp and the counter are intact, else " BAD\n". */
check:
    mov $STAMP, %rdi
    xor %ecx, %ecx
    xor %eax, %eax
    movabs $GOLDEN, %r9
1:  cmp %rax, (%rdi,%rcx,8)
    jne 3f
    add %r9, %rax
    inc %ecx
    cmp $STAMP_QWORDS, %ecx
    jne 1b
    mov lines(%rip), %rax
    mov $STEP, %ecx
    mul %rcx
    cmp counter(%rip), %rax
    jne 3f
    lea ok(%rip), %rsi
    ret
3:  lea bad(%rip), %rsi
    ret

msg: .asciz "count "
ok:  .asciz " ok\n"
bad: .asciz " BAD\n"

    .balign 8
counter: .quad 0
lines:   .quad 0
left:    .quad 0

    .include "lib.S"
