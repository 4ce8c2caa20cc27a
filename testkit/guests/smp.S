/* Multi-vCPU guest. The boot vCPU counts the processors in the MP table, wakes the others with
 * INIT-SIPI-SIPI into a real-mode trampoline that enters long mode on the VMM's page tables and
 * GDT, waits until every vCPU has reported its APIC id on the console, then resets. */
    .code64
    .text
    .globl _start

    .set LAPIC, 0xfee00000
    .set TRAMPOLINE, 0x8000
    .set LOCK, 0x7f00               /* console spinlock */
    .set ARRIVED, 0x7f08            /* vCPUs that reported */

_start:
    movq $0, LOCK
    movq $0, ARRIVED
    /* Count processor entries of the MP configuration table. */
    mov 0x9fc04, %ebx               /* floating pointer -> physptr */
    movzwl 34(%rbx), %ecx           /* entry count */
    lea 44(%rbx), %rdi
    xor %r12, %r12
1:  test %ecx, %ecx
    jz 3f
    cmpb $0, (%rdi)
    jne 3f                          /* processor entries come first */
    inc %r12
    add $20, %rdi
    dec %ecx
    jmp 1b
3:  lea m_cpus(%rip), %rsi
    call puts
    mov %r12, %rax
    call putdec
    mov $'\n', %al
    call putc

    /* Copy the trampoline below 1 MiB. */
    lea trampoline(%rip), %rsi
    mov $TRAMPOLINE, %rdi
    mov $(trampoline_end - trampoline), %rcx
    rep movsb

    /* Software-enable the LAPIC, then INIT and two SIPIs to all but self. */
    mov $LAPIC, %r14
    movl $0x1ff, 0xf0(%r14)
    movl $0, 0x310(%r14)
    movl $0x000c4500, 0x300(%r14)
    movl $0x000c4600 + (TRAMPOLINE >> 12), 0x300(%r14)
    movl $0x000c4600 + (TRAMPOLINE >> 12), 0x300(%r14)

    /* Report ourselves like the others, then wait for the rest (bounded). */
    call report
    mov $200000000, %r13
4:  mov ARRIVED, %rax
    cmp %r12, %rax
    jae 5f
    pause
    dec %r13
    jnz 4b
    lea m_timeout(%rip), %rsi
    call puts
    jmp reset
5:  lea m_all(%rip), %rsi
    call puts
    mov %r12, %rax
    call putdec
    lea m_up(%rip), %rsi
    call puts
    jmp reset

/* report: under the console lock, print "vCPU <apic id> up" and count this vCPU in. */
report:
    mov $1, %eax
1:  xchg %rax, LOCK
    test %rax, %rax
    jz 2f
    pause
    mov $1, %eax
    jmp 1b
2:  lea m_vcpu(%rip), %rsi
    call puts
    mov $LAPIC, %r14
    mov 0x20(%r14), %eax
    shr $24, %eax
    call putdec
    lea m_up(%rip), %rsi
    call puts
    lock incq ARRIVED
    movq $0, LOCK
    ret

/* Application processors arrive here in long mode with their own stack. */
ap_main:
    mov $LAPIC, %r14
    mov 0x20(%r14), %eax
    shr $24, %eax
    shl $12, %rax
    lea 0x70000(%rax), %rsp         /* 4 KiB stack per APIC id below 0x90000 */
    call report
1:  cli
    hlt
    jmp 1b

    /* Real-mode trampoline, copied to TRAMPOLINE; CS = TRAMPOLINE >> 4, IP = 0. */
    .code16
trampoline:
    cli
    xor %ax, %ax
    mov %ax, %ds
    lgdtl TRAMPOLINE + (gdt_ptr - trampoline)
    mov %cr4, %eax
    or $0x20, %eax                  /* PAE */
    mov %eax, %cr4
    mov $0x9000, %eax               /* the VMM's PML4 */
    mov %eax, %cr3
    mov $0xc0000080, %ecx           /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax            /* PG | PE */
    mov %eax, %cr0
    ljmpl $0x08, $(TRAMPOLINE + (tramp64 - trampoline))
    .code64
tramp64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    movabs $ap_main, %rax
    jmp *%rax
gdt_ptr:
    .word 31
    .long 0x500                     /* the VMM's boot GDT */
trampoline_end:

m_cpus:    .asciz "mptable cpus: "
m_vcpu:    .asciz "vCPU "
m_up:      .asciz " up\n"
m_all:     .asciz "all "
m_timeout: .asciz "timeout waiting for vCPUs\n"

    .include "lib.S"
