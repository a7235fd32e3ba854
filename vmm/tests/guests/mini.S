/*
 * A minimal PVH guest for fnode-vmm's tests: it proves the VMM's half of the boot contract
 * (PVH entry state, start info, serial, exit port, fault report, timeouts) without the real
 * guest kernel. 32-bit protected mode throughout; the first byte of the command line picks
 * what it does after printing "mini\n":
 *   s  exit with success (0x10, a 1-byte write)
 *   f  write a valid fault report (#UD at 0x101234) and exit with FAULT (0x12)
 *   g  write a report with a bad magic and exit with FAULT
 *   w  exit with 0x1234 (a 2-byte write)
 *   m  read unmapped MMIO at 0xd0000000 and exit with the value read (a 4-byte write)
 *   c  exit with the hvm_start_info magic (a 4-byte write): checks %ebx
 *   t  triple fault (empty IDT, then ud2)
 *   l  spin forever
 *   h  cli; hlt forever
 * Anything else: exit with FAILURE (0x11).
 */
        .code32
        .section .text, "ax"
        .globl pvh_start
pvh_start:
        mov     %ebx, %esi              /* hvm_start_info */
        mov     $0x3f8, %dx
        mov     $'m', %al
        out     %al, %dx
        mov     $'i', %al
        out     %al, %dx
        mov     $'n', %al
        out     %al, %dx
        mov     $'i', %al
        out     %al, %dx
        mov     $'\n', %al
        out     %al, %dx

        mov     24(%esi), %edi          /* cmdline_paddr (low half) */
        movzbl  (%edi), %eax
        mov     $0xf4, %dx
        cmp     $'s', %al
        je      success
        cmp     $'f', %al
        je      fault
        cmp     $'g', %al
        je      garbage
        cmp     $'w', %al
        je      word
        cmp     $'m', %al
        je      mmio
        cmp     $'c', %al
        je      magic
        cmp     $'t', %al
        je      triple
        cmp     $'l', %al
        je      spin
        cmp     $'h', %al
        je      halt
        mov     $0x11, %al
        out     %al, %dx
        jmp     spin

success:
        mov     $0x10, %al
        out     %al, %dx
        jmp     spin

fault:
        movl    $0x41464e46, 0x7000     /* magic "FNFAULT1", low half: "FNFA" */
        movl    $0x31544c55, 0x7004     /* high half: "ULT1" */
        movl    $6, 0x7008              /* vector */
        movl    $0, 0x700c
        movl    $0, 0x7010              /* error code */
        movl    $0, 0x7014
        movl    $0x101234, 0x7018       /* rip */
        movl    $0, 0x701c
        movl    $0, 0x7020              /* cr2 */
        movl    $0, 0x7024
        movl    $0x200000, 0x7028       /* rsp */
        movl    $0, 0x702c
        movl    $8, 0x7030              /* cs */
        movl    $0, 0x7034
        mov     $0x12, %al
        out     %al, %dx
        jmp     spin

garbage:
        movl    $0xdeadbeef, 0x7000
        movl    $0xdeadbeef, 0x7004
        mov     $0x12, %al
        out     %al, %dx
        jmp     spin

word:
        mov     $0x1234, %ax
        out     %ax, %dx
        jmp     spin

mmio:
        mov     0xd0000000, %eax
        out     %eax, %dx
        jmp     spin

magic:
        mov     (%esi), %eax
        out     %eax, %dx
        jmp     spin

triple:
        lidt    empty_idt
        ud2
        jmp     spin

halt:
        cli
1:      hlt
        jmp     1b

spin:
        jmp     spin

        .align 8
empty_idt:
        .word   0
        .long   0

        .section .note.Xen, "a", @note
        .align  4
        .long   4                       /* namesz */
        .long   4                       /* descsz */
        .long   18                      /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz  "Xen"
        .long   pvh_start
        .align  4
