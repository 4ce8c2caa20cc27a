/* Executes a breakpoint with no IDT: KVM cannot deliver it (an internal error on kvm_pvm, a triple
 * fault on hardware KVM); the VMM must report a failed guest and exit non-zero. */
    .code64
    .text
    .globl _start
_start:
    int3
1:  hlt
    jmp 1b
