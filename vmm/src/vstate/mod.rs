//! KVM state of one VM: guest [`memory`], the [`vm`] and its [`vcpu`]s.

pub mod memory;
pub mod vcpu;
pub mod vcpu_persist;
pub mod vcpu_pool;
pub mod vm;
pub mod vm_persist;
