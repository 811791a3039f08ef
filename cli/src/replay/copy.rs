//! Copying a range of a topic, as it is, to another topic (an incident's evidence, a
//! scratch copy to replay from).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use sluice_core::config::KafkaConfig;
use sluice_core::replay_scope::{Admit, ReplayScope};
use tokio_util::sync::CancellationToken;

use super::plan::Plan;
use super::run::{blocking, progress};
use super::{Filters, Outcome, REPLAYED_FROM};

/// Copy the plan's records to `to`, keeping keys, headers and timestamps.
pub(crate) async fn copy(
    kafka: &KafkaConfig,
    plan: &Plan,
    to: &str,
    filters: &Filters,
    stop: CancellationToken,
) -> Result<Outcome> {
    if to == plan.topic {
        bail!("--copy-to: the target must differ from the source `{to}`");
    }
    let consumer: BaseConsumer = kafka.consumer_config("sluice-replay-copy").create()?;
    let exists = blocking({
        let kafka = kafka.clone();
        let to = to.to_string();
        move || Ok(!sluice_core::kafka::end_offsets(&kafka, &to)?.is_empty())
    })?;
    if !exists {
        bail!("--copy-to: topic `{to}` does not exist; create it first");
    }
    let producer: FutureProducer = kafka.producer_config().create()?;
    let scope = ReplayScope::new(plan.ends(), filters.tenant.clone(), filters.rate);
    let mut tpl = TopicPartitionList::new();
    let mut next: HashMap<i32, i64> = HashMap::new();
    for r in plan.ranges.iter().filter(|r| r.start < r.end) {
        tpl.add_partition_offset(&plan.topic, r.partition, Offset::Offset(r.start))?;
        next.insert(r.partition, r.start);
    }
    let mut outcome = Outcome::default();
    let bar = progress(plan.records());
    if tpl.count() > 0 {
        consumer.assign(&tpl)?;
    }
    let mut deliveries = Vec::new();
    let done = |next: &HashMap<i32, i64>| {
        plan.ranges
            .iter()
            .all(|r| next.get(&r.partition).is_none_or(|n| *n >= r.end))
    };
    while !done(&next) {
        if stop.is_cancelled() {
            outcome.interrupted = true;
            break;
        }
        let Some(msg) = tokio::task::block_in_place(|| consumer.poll(Duration::from_millis(200)))
        else {
            // Skip past gaps (e.g. transaction markers) at the end of a range.
            if let Ok(position) = consumer.position() {
                for e in position.elements() {
                    if let (Offset::Offset(o), Some(n)) = (e.offset(), next.get_mut(&e.partition()))
                    {
                        *n = (*n).max(o);
                    }
                }
            }
            continue;
        };
        let msg = msg?;
        let (p, o) = (msg.partition(), msg.offset());
        next.insert(p, o + 1);
        match scope.admit(p, o, msg.headers()) {
            Admit::PastEnd => {
                next.insert(p, i64::MAX);
                continue;
            }
            Admit::Skip => {
                outcome.skipped += 1;
                continue;
            }
            Admit::Process => {}
        }
        outcome.read += 1;
        scope.throttle().await;
        let origin = sluice_core::headers::origin(&plan.topic, p, o);
        let mut headers = msg
            .headers()
            .map(|h| sluice_core::headers::without(Some(h), &[REPLAYED_FROM]))
            .unwrap_or_else(OwnedHeaders::new);
        headers = headers.insert(Header {
            key: REPLAYED_FROM,
            value: Some(origin.as_str()),
        });
        let mut record = FutureRecord::to(to)
            .payload(msg.payload().unwrap_or_default())
            .headers(headers);
        if let Some(key) = msg.key() {
            record = record.key(key);
        }
        if let Some(ts) = msg.timestamp().to_millis() {
            record = record.timestamp(ts);
        }
        let delivery = loop {
            match producer.send_result(record) {
                Ok(d) => break d,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    outcome.written += await_all(std::mem::take(&mut deliveries)).await?;
                    record = r;
                }
                Err((e, _)) => return Err(e).context("copying a record"),
            }
        };
        deliveries.push(delivery);
        if deliveries.len() >= 1000 {
            outcome.written += await_all(std::mem::take(&mut deliveries)).await?;
        }
        bar.set_position(outcome.read + outcome.skipped);
    }
    outcome.written += await_all(deliveries).await?;
    bar.finish_and_clear();
    if outcome.interrupted {
        let resume = plan.resume_offsets(&next);
        outcome.resume = (!resume.is_empty()).then_some(resume);
    }
    Ok(outcome)
}

async fn await_all(deliveries: Vec<rdkafka::producer::DeliveryFuture>) -> Result<u64> {
    let n = deliveries.len() as u64;
    for d in futures::future::join_all(deliveries).await {
        d.context("copying a record: delivery cancelled")?
            .map_err(|(e, _)| e)
            .context("copying a record")?;
    }
    Ok(n)
}
