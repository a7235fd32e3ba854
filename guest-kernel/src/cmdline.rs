//! The kernel's command line switches (`fnode_guest::abi::cmdline`).

use fnode_guest::abi::cmdline;

/// A fault the kernel raises on purpose after its banner (`fault=<kind>`), for tests of the
/// fault path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultSwitch {
    /// `fault=ud2`: an invalid opcode (#UD).
    Ud2,
    /// `fault=pagefault`: a read of [`cmdline::PAGEFAULT_ADDR`], outside the identity map (#PF).
    PageFault,
    /// `fault=loop`: spin forever; the host's timeout stops the guest.
    Loop,
}

/// Errors in the command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError<'a> {
    /// `fault=` names no known fault.
    #[error(
        "unknown fault={0}: expected {ud2}, {pf} or {lp}",
        ud2 = cmdline::FAULT_UD2,
        pf = cmdline::FAULT_PAGEFAULT,
        lp = cmdline::FAULT_LOOP
    )]
    UnknownFault(&'a str),
}

/// The `fault=` switch of `line`, if any.
pub fn fault_switch(line: &str) -> Result<Option<FaultSwitch>, CmdlineError<'_>> {
    let Some(kind) = cmdline::get(line, cmdline::FAULT_KEY) else {
        return Ok(None);
    };
    match kind {
        cmdline::FAULT_UD2 => Ok(Some(FaultSwitch::Ud2)),
        cmdline::FAULT_PAGEFAULT => Ok(Some(FaultSwitch::PageFault)),
        cmdline::FAULT_LOOP => Ok(Some(FaultSwitch::Loop)),
        other => Err(CmdlineError::UnknownFault(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fault_switches() {
        assert_eq!(fault_switch(""), Ok(None));
        assert_eq!(fault_switch("console=ttyS0 quiet"), Ok(None));
        assert_eq!(fault_switch("fault=ud2"), Ok(Some(FaultSwitch::Ud2)));
        assert_eq!(
            fault_switch("a=1 fault=pagefault b"),
            Ok(Some(FaultSwitch::PageFault))
        );
        assert_eq!(fault_switch("fault=loop"), Ok(Some(FaultSwitch::Loop)));
    }

    #[test]
    fn rejects_unknown_faults() {
        assert_eq!(
            fault_switch("fault=nope"),
            Err(CmdlineError::UnknownFault("nope"))
        );
        assert_eq!(fault_switch("fault="), Err(CmdlineError::UnknownFault("")));
        assert_eq!(
            CmdlineError::UnknownFault("x").to_string(),
            "unknown fault=x: expected ud2, pagefault or loop"
        );
    }
}
