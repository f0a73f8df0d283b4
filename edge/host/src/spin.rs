//! Spin's `key-value` and `variables` interfaces, implemented for the host.
//!
//! The edge component imports both (spin-sdk 7: every function `async`), so
//! the bindings come from our own WIT in `wit/` and the implementations go
//! through the generated `…WithStore` traits: an async import gets an
//! [`Accessor`] instead of `&mut self`, and must not hold the store across
//! an `.await`. Each function therefore copies what it needs out of the
//! store ([`Shared`] is behind an `Arc`) and then awaits the backend.
//!
//! The store data type is generic (`T`) and reaches our part of it through
//! [`SpinView`], so the same code serves every request's store.

use std::collections::BTreeMap;
use std::sync::Arc;

use wasmtime::component::{
    Access, Accessor, FutureReader, HasData, Linker, Resource, ResourceTable, StreamReader,
};

use crate::kv::Kv;

mod bindings {
    wasmtime::component::bindgen!({
        path: [
            "../../wit/spin-key-value.wit",
            "../../wit/spin-variables.wit",
            "../../wit/host.wit",
        ],
        world: "outpost:edge-host/host",
        imports: { default: store | trappable },
        with: {
            "spin:key-value/key-value.store": super::StoreHandle,
        },
    });
}

use bindings::spin::key_value::key_value::{self as kv_wit, Error as KvError};
use bindings::spin::variables::variables::{self as vars_wit, Error as VarError};

/// The only store label the host knows; Spin's default store.
pub(crate) const DEFAULT_STORE: &str = "default";

/// What every request of one host shares: the Spin variables, the
/// `default` key-value store and the pool of outbound connections.
pub(crate) struct Shared {
    pub(crate) variables: BTreeMap<String, String>,
    pub(crate) kv: Kv,
    pub(crate) outbound: crate::state::OutboundClient,
}

/// An open `store` resource. Only `default` can be opened, so it carries
/// nothing; the table entry is what makes the guest's handle valid.
pub struct StoreHandle;

/// The part of a request's store data the Spin interfaces use.
pub(crate) struct SpinView<'a> {
    pub(crate) table: &'a mut ResourceTable,
    pub(crate) shared: &'a Arc<Shared>,
}

/// Names the Spin implementations for `bindgen!`'s `HasData` plumbing.
pub(crate) struct Spin;

impl HasData for Spin {
    type Data<'a> = SpinView<'a>;
}

/// Links both Spin interfaces; `view` projects a request's store data.
pub(crate) fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> SpinView<'_>,
) -> wasmtime::Result<()> {
    kv_wit::add_to_linker::<T, Spin>(linker, view)?;
    vars_wit::add_to_linker::<T, Spin>(linker, view)?;
    Ok(())
}

impl kv_wit::Host for SpinView<'_> {}
impl kv_wit::HostStore for SpinView<'_> {}
impl vars_wit::Host for SpinView<'_> {}

/// The shared state, after checking that `store` is a handle this request
/// opened (a forged or dropped handle is a guest bug: it traps).
fn shared_for<T>(
    accessor: &Accessor<T, Spin>,
    store: &Resource<StoreHandle>,
) -> wasmtime::Result<Arc<Shared>> {
    accessor.with(|mut access| {
        let view = access.get();
        view.table.get(store)?;
        Ok(Arc::clone(view.shared))
    })
}

fn other(e: crate::kv::StoreError) -> KvError {
    KvError::Other(e.to_string())
}

impl<T> kv_wit::HostStoreWithStore<T> for Spin {
    async fn open(
        accessor: &Accessor<T, Self>,
        label: String,
    ) -> wasmtime::Result<Result<Resource<StoreHandle>, KvError>> {
        if label != DEFAULT_STORE {
            return Ok(Err(KvError::NoSuchStore));
        }
        accessor.with(|mut access| match access.get().table.push(StoreHandle) {
            Ok(handle) => Ok(Ok(handle)),
            // The table is per request and bounded; a guest that opens
            // stores in a loop gets Spin's answer rather than a trap.
            Err(_) => Ok(Err(KvError::StoreTableFull)),
        })
    }

    async fn get(
        accessor: &Accessor<T, Self>,
        store: Resource<StoreHandle>,
        key: String,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, KvError>> {
        let shared = shared_for(accessor, &store)?;
        Ok(shared.kv.get(&key).await.map_err(other))
    }

    async fn set(
        accessor: &Accessor<T, Self>,
        store: Resource<StoreHandle>,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), KvError>> {
        let shared = shared_for(accessor, &store)?;
        Ok(shared.kv.set(&key, value).await.map_err(other))
    }

    async fn delete(
        accessor: &Accessor<T, Self>,
        store: Resource<StoreHandle>,
        key: String,
    ) -> wasmtime::Result<Result<(), KvError>> {
        let shared = shared_for(accessor, &store)?;
        Ok(shared.kv.delete(&key).await.map_err(other))
    }

    async fn exists(
        accessor: &Accessor<T, Self>,
        store: Resource<StoreHandle>,
        key: String,
    ) -> wasmtime::Result<Result<bool, KvError>> {
        let shared = shared_for(accessor, &store)?;
        Ok(shared.kv.exists(&key).await.map_err(other))
    }

    async fn get_keys(
        accessor: &Accessor<T, Self>,
        store: Resource<StoreHandle>,
    ) -> wasmtime::Result<(StreamReader<String>, FutureReader<Result<(), KvError>>)> {
        let shared = shared_for(accessor, &store)?;
        // Listed up front: the edge never lists keys, so streaming them
        // lazily from the backend is not worth a cursor kept across awaits.
        let (keys, done) = match shared.kv.keys().await {
            Ok(keys) => (keys, Ok(())),
            Err(e) => (Vec::new(), Err(other(e))),
        };
        accessor.with(|mut access| {
            let stream = StreamReader::new(&mut access, keys)?;
            let future =
                FutureReader::new(&mut access, async move { wasmtime::Result::<_>::Ok(done) })?;
            Ok((stream, future))
        })
    }

    fn drop(mut access: Access<'_, T, Self>, store: Resource<StoreHandle>) -> wasmtime::Result<()> {
        access.get().table.delete(store)?;
        Ok(())
    }
}

/// Spin's rule for variable names: lower-case ASCII letters, digits and
/// `_`, starting with a letter.
fn valid_variable_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl<T> vars_wit::HostWithStore<T> for Spin {
    async fn get(
        accessor: &Accessor<T, Self>,
        name: String,
    ) -> wasmtime::Result<Result<String, VarError>> {
        if !valid_variable_name(&name) {
            return Ok(Err(VarError::InvalidName(name)));
        }
        Ok(accessor.with(
            |mut access| match access.get().shared.variables.get(&name) {
                Some(v) => Ok(v.clone()),
                None => Err(VarError::Undefined(name)),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::valid_variable_name;

    #[test]
    fn variable_names_follow_spin() {
        for ok in ["aggregator_url", "a", "edge_key_id2"] {
            assert!(valid_variable_name(ok), "{ok}");
        }
        for bad in ["", "Aggregator", "_x", "1a", "a-b", "a.b"] {
            assert!(!valid_variable_name(bad), "{bad}");
        }
    }
}
