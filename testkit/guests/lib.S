/* Shared routines for 64-bit test guests: serial output on COM1 and reset through the i8042.
 * Calling convention: arguments in %rax / %rsi, clobbers %rax %rcx %rdx %rsi %r8 only. */
    .code64
    .text

/* puts: print the NUL-terminated string at %rsi. */
puts:
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  ret

/* putc: print the byte in %al. */
putc:
    mov $0x3f8, %dx
    out %al, %dx
    ret

/* puthex: print %rax as 8 hexadecimal digits (low 32 bits). */
puthex:
    mov %rax, %rsi
    mov $8, %ecx
1:  rol $4, %esi
    mov %esi, %eax
    and $0xf, %eax
    cmp $10, %al
    jb 2f
    add $('a' - '0' - 10), %al
2:  add $'0', %al
    mov $0x3f8, %dx
    out %al, %dx
    dec %ecx
    jnz 1b
    ret

/* putdec: print %rax in decimal without leading zeros (clobbers %r8 too). */
putdec:
    mov %rax, %rsi
    xor %ecx, %ecx
    mov $10, %r8
1:  mov %rsi, %rax
    xor %edx, %edx
    div %r8
    mov %rax, %rsi
    add $'0', %dl
    push %rdx
    inc %ecx
    test %rsi, %rsi
    jnz 1b
2:  pop %rax
    call putc
    dec %ecx
    jnz 2b
    ret

/* reset: pulse the reset line through the i8042; the VMM exits with status 0. */
reset:
    mov $0xfe, %al
    out %al, $0x64
1:  hlt
    jmp 1b
