//! Does the broker honour the consumer's fetch limits? Writes a backlog of 300 records
//! of 900 KB to a fresh topic, reads five with a bare librdkafka consumer (the stack's
//! consumer settings, plus whatever `SLUICE__KAFKA__CONSUMER` adds, e.g.
//! `fetch.max.bytes=1048576,queued.max.messages.kbytes=4096`) and prints the process's
//! resident memory. A broker that honours `fetch.max.bytes` leaves it near the limits; one
//! that answers a fetch with the whole partition (the stack's noida-db does) puts the
//! whole backlog in memory, which is what `flood` then measures in the slower consumers.

use std::time::{Duration, Instant};

use anyhow::Result;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice_bench::procstat::rss_bytes;

fn rss_mib() -> Result<(u64, u64)> {
    let (now, peak) = rss_bytes(std::process::id() as i32)?;
    Ok((now >> 20, peak >> 20))
}

#[tokio::main]
async fn main() -> Result<()> {
    let config = sluice_tests::stack_config();
    let topic = sluice_tests::unique("probe-");
    sluice_core::kafka::create_topics(&config.kafka, 1, 1, &[(topic.clone(), "3600000".into())])
        .await?;
    let producer: FutureProducer = config.kafka.producer_config().create()?;
    let payload = vec![b'x'; 900_000];
    let mut acks = Vec::new();
    for _ in 0..300 {
        acks.push(
            producer
                .send_result(FutureRecord::<str, _>::to(&topic).payload(&payload))
                .map_err(|(e, _)| e)?,
        );
    }
    for a in acks {
        let _ = a.await;
    }
    println!(
        "backlog: 300 records of 900 KB; resident before reading: {} MiB",
        rss_mib()?.0
    );
    let consumer: BaseConsumer = config
        .kafka
        .consumer_config(&sluice_tests::unique("probe-group-"))
        .create()?;
    consumer.subscribe(&[&topic])?;
    let mut read = 0;
    let started = Instant::now();
    while read < 5 && started.elapsed() < Duration::from_secs(20) {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(500)) {
            read += 1;
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let (now, peak) = rss_mib()?;
    println!("after reading {read} records: resident {now} MiB (peak {peak} MiB)");
    drop(consumer);
    sluice_core::kafka::delete_topics(&config.kafka, &[&topic]).await?;
    Ok(())
}
