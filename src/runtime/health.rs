//! Kafka's health as the poll thread sees it: errors librdkafka reports through the consumer,
//! turned into the end of [`Runtime::run`](crate::Runtime::run) when they mean the consumer
//! cannot work, instead of a log line repeated forever.
//!
//! - A **fatal** error (for example `FENCED_INSTANCE_ID`, another member with this
//!   `group.instance.id`) ends the run at once: librdkafka will not consume again.
//! - **No broker reachable** (`all brokers are down`), or a **subscribed topic that does not
//!   exist**, ends the run once it has lasted the configured time: the condition is checked
//!   again then with a metadata request, so a cluster that came back in between clears it.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::error::Error;

/// What lasts until it is checked again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Condition {
    NoBroker,
    TopicMissing,
}

/// The poll thread's view of Kafka's health.
#[derive(Debug)]
pub(crate) struct Health {
    topics: Vec<String>,
    limit: Duration,
    since: Option<(Condition, Instant)>,
}

/// How long a metadata request that checks a condition may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

impl Health {
    pub(crate) fn new(topics: Vec<String>, limit: Duration) -> Self {
        Health {
            topics,
            limit,
            since: None,
        }
    }

    /// An error the consumer reported. `Err` when the run must end now.
    pub(crate) fn error(&mut self, error: &KafkaError) -> Result<(), Error> {
        let condition = match error {
            KafkaError::MessageConsumptionFatal(_) => {
                return Err(Error::kafka(
                    "the consumer failed fatally (librdkafka will not consume again)",
                    error.clone(),
                ));
            }
            KafkaError::MessageConsumption(code) => match code {
                RDKafkaErrorCode::AllBrokersDown => Condition::NoBroker,
                RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic => {
                    Condition::TopicMissing
                }
                _ => return Ok(()),
            },
            _ => return Ok(()),
        };
        // The first sign of a condition starts its clock; a later sign of it does not.
        if self.since.is_none_or(|(c, _)| c != condition) {
            self.since = Some((condition, Instant::now()));
        }
        Ok(())
    }

    /// Called on every turn of the poll loop: once a condition has lasted the limit, checks it
    /// with a metadata request; `Err` when it still holds.
    pub(crate) fn check<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), Error> {
        let Some((condition, since)) = self.since else {
            return Ok(());
        };
        if since.elapsed() < self.limit {
            return Ok(());
        }
        let lasted = self.limit;
        match condition {
            Condition::NoBroker => match consumer.fetch_metadata(None, CHECK_TIMEOUT) {
                Ok(_) => {
                    self.since = None;
                    Ok(())
                }
                Err(e) => Err(Error::kafka(
                    format!("no Kafka broker reachable for {lasted:?} (bootstrap.servers)"),
                    e,
                )),
            },
            Condition::TopicMissing => {
                for topic in &self.topics {
                    let missing = match consumer.fetch_metadata(Some(topic), CHECK_TIMEOUT) {
                        Ok(metadata) => metadata
                            .topics()
                            .iter()
                            .any(|t| t.name() == topic && t.error().is_some()),
                        // Unreachable now: that is the other condition's clock.
                        Err(_) => {
                            self.since = Some((Condition::NoBroker, Instant::now()));
                            return Ok(());
                        }
                    };
                    if missing {
                        return Err(Error::kafka(
                            format!(
                                "subscribed topic {topic:?} has not existed for {lasted:?}: \
                                 create it, or fix the name"
                            ),
                            KafkaError::MessageConsumption(
                                RDKafkaErrorCode::UnknownTopicOrPartition,
                            ),
                        ));
                    }
                }
                self.since = None;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_errors_end_the_run_and_other_errors_start_a_clock() {
        let mut health = Health::new(vec!["t".into()], Duration::from_secs(60));
        let fatal = KafkaError::MessageConsumptionFatal(RDKafkaErrorCode::FencedInstanceId);
        let err = health.error(&fatal).unwrap_err();
        assert!(err.to_string().contains("fatally"), "{err}");

        let down = KafkaError::MessageConsumption(RDKafkaErrorCode::AllBrokersDown);
        health.error(&down).unwrap();
        let (condition, first) = health.since.unwrap();
        assert_eq!(condition, Condition::NoBroker);
        health.error(&down).unwrap();
        assert_eq!(
            health.since.unwrap().1,
            first,
            "a repeat keeps the first time"
        );

        let transport = KafkaError::MessageConsumption(RDKafkaErrorCode::BrokerTransportFailure);
        health.error(&transport).unwrap();
        assert_eq!(
            health.since.unwrap().1,
            first,
            "other errors change nothing"
        );

        let missing = KafkaError::MessageConsumption(RDKafkaErrorCode::UnknownTopicOrPartition);
        health.error(&missing).unwrap();
        assert_eq!(health.since.unwrap().0, Condition::TopicMissing);
    }
}
