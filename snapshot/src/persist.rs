//! The [`Persist`] trait: how a snapshot-able object saves its state and is built back.
//!
//! The shape is Firecracker's (`snapshot/persist.rs`): the state is plain serde data, the
//! live resources an object needs to come back (guest memory, an eventfd, a console) are its
//! constructor arguments, and restoring validates the state on the way in (it comes from a
//! file and is untrusted).

/// An object whose state can be saved into a snapshot and restored from it.
///
/// ```
/// use fnode_snapshot::Persist;
///
/// #[derive(Debug, PartialEq)]
/// struct Counter { step: u32, value: u64 }
///
/// impl<'a> Persist<'a> for Counter {
///     type State = u64;
///     type ConstructorArgs = u32;
///     type Error = std::convert::Infallible;
///
///     fn save(&self) -> u64 { self.value }
///     fn restore(step: u32, state: &u64) -> Result<Self, Self::Error> {
///         Ok(Counter { step, value: *state })
///     }
/// }
///
/// let c = Counter { step: 2, value: 7 };
/// assert_eq!(Counter::restore(2, &c.save()).unwrap(), c);
/// ```
pub trait Persist<'a>
where
    Self: Sized,
{
    /// The saved state: plain data (serde `Serialize + Deserialize`), no fds, no pointers.
    type State;
    /// What [`Persist::restore`] needs besides the state: live resources of the new VM.
    type ConstructorArgs;
    /// Why a state could not be restored.
    type Error;

    /// The object's state, as it is now.
    fn save(&self) -> Self::State;

    /// Builds the object back from a saved `state` (untrusted: validate it).
    fn restore(
        constructor_args: Self::ConstructorArgs,
        state: &Self::State,
    ) -> Result<Self, Self::Error>;
}
