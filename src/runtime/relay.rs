//! The outbox's relay started with the runtime (feature `outbox`):
//! [`RuntimeBuilder::relay`], run beside the consumer and stopped after its last commit.

use std::sync::Arc;

use futures::future::BoxFuture;
use rdkafka::ClientConfig;
use tokio::sync::oneshot;

use super::RuntimeBuilder;
use crate::error::Result;
use crate::outbox::{OutboxStore, Relay, RelayConfig, RelayStats};
use crate::store::Store;

/// Makes the relay once the runtime is built: from its store and its client settings.
pub(super) type Start<S> = Box<dyn FnOnce(&S, &ClientConfig) -> Result<Prepared> + Send>;

/// A relay made, not started yet.
pub(crate) struct Prepared {
    run: Box<dyn FnOnce(oneshot::Receiver<()>) -> BoxFuture<'static, Result<()>> + Send>,
    pub(crate) stats: Arc<RelayStats>,
}

/// A relay running beside the consumer.
pub(crate) struct Running {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Prepared {
    pub(crate) fn spawn(self) -> Running {
        let (stop, stopped) = oneshot::channel();
        Running {
            stop,
            task: tokio::spawn((self.run)(stopped)),
        }
    }
}

impl Running {
    /// Stops it after the consumer's last commit and waits for it: it first relays what is
    /// waiting, what that commit published included, for at most
    /// [`RelayConfig::shutdown_drain`].
    pub(crate) async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(crate::Error::Task(format!(
                "the outbox relay panicked: {e}"
            ))),
        }
    }
}

impl<S: Store + OutboxStore> RuntimeBuilder<S> {
    /// Runs a [`Relay`] of the store's outbox beside the consumer (feature `outbox`): what the
    /// handler publishes through its transaction is produced to Kafka once its batch commits,
    /// through a producer with the consumer's connection settings. Call it after
    /// [`store`](RuntimeBuilder::store). On PostgreSQL every instance of the group may run
    /// one: one at a time holds the outbox's lease and the others stand by.
    pub fn relay(mut self, config: RelayConfig) -> Self {
        self.relay = Some(Box::new(move |store: &S, client: &ClientConfig| {
            let relay = Relay::new(store.clone(), client, config)?;
            let stats = relay.stats();
            Ok(Prepared {
                run: Box::new(move |stopped| {
                    Box::pin(relay.run(async {
                        let _ = stopped.await;
                    }))
                }),
                stats,
            })
        }));
        self
    }
}
