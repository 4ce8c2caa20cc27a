/* virtio-vsock across a snapshot, driven by its interrupt as a kernel's driver is: sets up the
 * vsock device with one 8-byte event buffer (filled with 0xff), routes its interrupt (the IRQ
 * of its command-line entry) through the IOAPIC to vector 0x30 on the enabled LAPIC, then
 * prints "tick N ok" (print_tick) forever with interrupts on (the PICs masked). The handler acknowledges the
 * device's interrupt status and counts; the main loop looks at the event queue only after an
 * interrupt, and prints "transport reset by interrupt: id=I" once for a used event buffer.
 * A restored VMM whose reset interrupt the guest never gets leaves it ticking without it. */
    .code64
    .include "virtio_defs.S"
    .text
    .globl _start

    .set RXQ, 0x200000
    .set TXQ, 0x201000
    .set EVQ, 0x202000
    .set EVBUF, 0x300000
    .set IDT, 0x301000
    .set LAPIC, 0xfee00000
    .set IOAPIC, 0xfec00000
    .set VECTOR, 0x30

_start:
    call vsock_setup
    call first_irq
    mov %eax, %r12d

    /* An IDT whose only present gate is VECTOR's: a 64-bit interrupt gate, code selector 8
     * of the VMM's boot GDT. */
    mov $IDT, %edi
    xor %eax, %eax
    mov $4096, %ecx
    rep stosb
    lea irq_handler(%rip), %rax
    mov $(IDT + VECTOR * 16), %edi
    mov %ax, (%rdi)
    movw $0x08, 2(%rdi)
    movw $0x8e00, 4(%rdi)
    shr $16, %rax
    mov %ax, 6(%rdi)
    shr $16, %rax
    mov %eax, 8(%rdi)
    lidt idt_ptr(%rip)

    /* Both 8259 PICs masked (their line reaches the LAPIC too); the LAPIC software-enabled;
     * the IOAPIC pin: VECTOR, edge, active high, to APIC 0. */
    mov $0xff, %al
    out %al, $0x21
    out %al, $0xa1
    mov $LAPIC, %r8d
    movl $0x1ff, 0xf0(%r8)
    mov $IOAPIC, %r8d
    lea 0x10(,%r12,2), %eax
    mov %eax, (%r8)
    movl $VECTOR, 0x10(%r8)
    inc %eax
    mov %eax, (%r8)
    movl $0, 0x10(%r8)

    movq $-1, EVBUF
    DESC EVQ, 0, EVBUF, 8, DESC_F_WRITE, 0
    xor %edi, %edi
    mov $EVQ, %esi
    call vq_kick
    sti

tick:
    call print_tick
    xor %eax, %eax
    xchg %rax, irqs(%rip)
    test %rax, %rax
    jz tick
    mov $EVQ, %esi
    call vq_poll
    cmp $-1, %eax
    je tick
    PRINT "transport reset by interrupt: id="
    mov EVBUF, %eax
    call putdec
    PRINT "\n"
    jmp tick

/* irq_handler: acknowledges the device's interrupt status (%r15 keeps its window), counts
 * the interrupt and ends it at the LAPIC. */
irq_handler:
    push %rax
    mov 0x60(%r15), %eax
    mov %eax, 0x64(%r15)
    lock incq irqs(%rip)
    mov $LAPIC, %eax
    movl $0, 0xb0(%rax)
    pop %rax
    iretq

/* first_irq → %eax = the IRQ of the first virtio-mmio entry of the command line
 * (`...@0x<base>:<irq>`). */
first_irq:
    mov cmdline_ptr(%rip), %rdi
    call next_mmio
    xor %eax, %eax
    cmpb $':', (%rdi)
    jne 2f
1:  inc %rdi
    movzbl (%rdi), %ecx
    sub $'0', %ecx
    cmp $9, %ecx
    ja 2f
    imul $10, %eax, %eax
    add %ecx, %eax
    jmp 1b
2:  ret

idt_ptr:
    .word 4095
    .quad IDT

    .data
irqs: .quad 0
    .text

    .include "virtio_vsock_lib.S"
    .include "virtio_lib.S"
    .include "lib.S"
