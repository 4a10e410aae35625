//! The baseline: the same load through mosquitto (QoS 1) with rumqttc — one publisher with 100
//! messages in flight, one subscriber — and raw idle MQTT connections for the memory figure.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::stats::{Pacer, Percentiles, Tracker, now_ns};

const TOPIC: &str = "meshgram/bench";
/// Payload size, the same as the mesh's sealed content.
pub(crate) const PAYLOAD_LEN: usize = 256;
/// QoS 1 messages the publisher keeps unacknowledged (as in shared/BASELINES.md).
pub(crate) const INFLIGHT: u16 = 100;
/// rumqttc's request queue in front of the in-flight window. Small, so that a message's
/// timestamp is taken close to when it enters the window, as on the mesh side.
const REQUEST_QUEUE: usize = 10;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A publisher and a subscriber connected to one broker; their event loops run as tasks.
#[derive(Debug)]
pub(crate) struct MqttRig {
    publisher: AsyncClient,
    publisher_loop: JoinHandle<()>,
    subscriber_loop: JoinHandle<()>,
}

impl MqttRig {
    /// Connects the subscriber (waits for its SUBACK), then the publisher.
    pub(crate) async fn start(port: u16, tracker: Arc<Tracker>) -> anyhow::Result<Self> {
        let mut options = MqttOptions::new("meshgram-bench-sub", "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30)).set_clean_session(true);
        let (subscriber, mut events) = AsyncClient::new(options, REQUEST_QUEUE);
        subscriber.subscribe(TOPIC, QoS::AtLeastOnce).await?;
        tokio::time::timeout(CONNECT_TIMEOUT, async {
            loop {
                if let Event::Incoming(Packet::SubAck(_)) = events.poll().await? {
                    return anyhow::Ok(());
                }
            }
        })
        .await
        .context("no SUBACK from mosquitto")??;
        let subscriber_loop = tokio::spawn(subscribe_loop(subscriber, events, Arc::clone(&tracker)));

        let mut options = MqttOptions::new("meshgram-bench-pub", "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30)).set_clean_session(true).set_inflight(INFLIGHT);
        let (publisher, events) = AsyncClient::new(options, REQUEST_QUEUE);
        let publisher_loop = tokio::spawn(publish_loop(events, tracker));
        Ok(MqttRig { publisher, publisher_loop, subscriber_loop })
    }

    /// Publishes message `i` with its number and send time (default: now) in the payload.
    pub(crate) async fn publish(&self, i: usize, sent_at: Option<u64>) -> anyhow::Result<()> {
        let mut payload = vec![0x5a; PAYLOAD_LEN];
        payload[..8].copy_from_slice(&(i as u64).to_le_bytes());
        payload[8..16].copy_from_slice(&sent_at.unwrap_or_else(now_ns).to_le_bytes());
        self.publisher.publish(TOPIC, QoS::AtLeastOnce, false, payload).await?;
        Ok(())
    }

    /// Publishes `range` back to back (the in-flight window holds it back), until `deadline`.
    pub(crate) async fn publish_saturated(&self, range: Range<usize>, deadline: Instant) -> anyhow::Result<()> {
        for i in range {
            if Instant::now() >= deadline {
                break;
            }
            self.publish(i, None).await?;
        }
        Ok(())
    }

    /// Publishes `range` at `per_second`; returns how late the pacer ran.
    pub(crate) async fn publish_paced(
        &self,
        range: Range<usize>,
        per_second: f64,
        deadline: Instant,
    ) -> anyhow::Result<Option<Percentiles>> {
        let mut pacer = Pacer::new(per_second);
        for i in range {
            let due = pacer.tick().await;
            if Instant::now() >= deadline {
                break;
            }
            self.publish(i, Some(due)).await?;
        }
        Ok(pacer.lag())
    }

    /// Whether both event loops are still running (they stop on a connection error).
    pub(crate) fn healthy(&self) -> bool {
        !self.publisher_loop.is_finished() && !self.subscriber_loop.is_finished()
    }
}

impl Drop for MqttRig {
    fn drop(&mut self) {
        self.publisher_loop.abort();
        self.subscriber_loop.abort();
    }
}

/// Counts PUBACKs: the broker has the message (mosquitto acknowledges on receipt; its
/// persistence is a periodic snapshot, so this is not a durable acknowledgement).
async fn publish_loop(mut events: EventLoop, tracker: Arc<Tracker>) {
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) => tracker.bulk_ack(now_ns()),
            Ok(_) => {}
            Err(e) => {
                eprintln!("  mqtt publisher: {e}");
                return;
            }
        }
    }
}

/// Notes each arrival against the send time embedded in its payload (same process, one clock).
async fn subscribe_loop(_client: AsyncClient, mut events: EventLoop, tracker: Arc<Tracker>) {
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let at = now_ns();
                let field = |r: Range<usize>| publish.payload.get(r).and_then(|b| <[u8; 8]>::try_from(b).ok());
                if let (Some(number), Some(sent)) = (field(0..8), field(8..16)) {
                    let number = u64::from_le_bytes(number) as usize;
                    if number < tracker.len() {
                        tracker.sent(number, u64::from_le_bytes(sent));
                        tracker.received(number, at);
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("  mqtt subscriber: {e}");
                return;
            }
        }
    }
}

/// Opens `n` MQTT connections (CONNECT, clean session, keep-alive off, read CONNACK) and keeps
/// them open: the leanest possible idle client, so the figure is the broker's cost alone.
pub(crate) async fn idle_connections(port: u16, n: usize, concurrency: usize) -> anyhow::Result<Vec<TcpStream>> {
    let results: Vec<anyhow::Result<TcpStream>> =
        futures::stream::iter(0..n).map(|i| connect_raw(port, i)).buffer_unordered(concurrency).collect().await;
    let mut streams = Vec::with_capacity(n);
    let mut first_error = None;
    for result in results {
        match result {
            Ok(stream) => streams.push(stream),
            Err(e) => first_error = first_error.or(Some(e)),
        }
    }
    if let Some(e) = first_error {
        eprintln!("  {} of {n} idle MQTT connections failed; first error: {e:#}", n - streams.len());
    }
    Ok(streams)
}

async fn connect_raw(port: u16, i: usize) -> anyhow::Result<TcpStream> {
    let id = format!("idle-{i}");
    let mut packet = vec![0x10, (12 + id.len()) as u8, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 0];
    packet.extend((id.len() as u16).to_be_bytes());
    packet.extend(id.as_bytes());
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(("127.0.0.1", port))).await??;
    stream.write_all(&packet).await?;
    let mut connack = [0u8; 4];
    tokio::time::timeout(CONNECT_TIMEOUT, stream.read_exact(&mut connack)).await??;
    if connack[0] != 0x20 || connack[3] != 0 {
        bail!("CONNACK {connack:02x?}");
    }
    Ok(stream)
}
