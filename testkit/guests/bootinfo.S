/* Reads the Linux zero page (RSI at entry) and prints the command line, the e820 map size and
 * the highest RAM address, then resets. */
    .code64
    .text
    .globl _start
_start:
    mov %rsi, %rbx                  /* zero page */
    lea m_cmdline(%rip), %rsi
    call puts
    mov 0x228(%rbx), %esi           /* hdr.cmd_line_ptr */
    call puts
    lea m_e820(%rip), %rsi
    call puts
    movzbl 0x1e8(%rbx), %eax        /* e820_entries */
    mov %rax, %r12
    call putdec
    /* Last e820 entry: addr + size = end of RAM. Entries are 20 bytes from 0x2d0. */
    lea m_end(%rip), %rsi
    call puts
    mov %r12, %rax
    dec %rax
    imul $20, %rax
    lea 0x2d0(%rbx,%rax), %rcx
    mov (%rcx), %rax
    add 8(%rcx), %rax
    shr $20, %rax
    call putdec
    lea m_mib(%rip), %rsi
    call puts
    jmp reset

m_cmdline: .asciz "cmdline: "
m_e820:    .asciz "\ne820 entries: "
m_end:     .asciz "\nram end MiB: "
m_mib:     .asciz "\n"

    .include "lib.S"
