//! [`RuntimeBuilder::resolver`] (feature `resolve`): the resolver the runtime consults before
//! each handler call (`partition/resolve.rs`).

use super::builder::RuntimeBuilder;

impl<S> RuntimeBuilder<S> {
    /// Decides between valid, distinct updates of one entity before the handler runs (feature
    /// `resolve`): see [`resolve`](crate::resolve). The store must keep entities (RocksDB and
    /// PostgreSQL do); `build` refuses one that does not.
    pub fn resolver(mut self, resolver: crate::resolve::Resolver) -> Self {
        self.resolver = Some(resolver);
        self
    }
}
