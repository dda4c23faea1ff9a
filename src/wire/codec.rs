//! gRPC length-prefixed framing for `proto.Frame` streams.
//!
//! Invariants:
//! - A message length is checked against its limit before a byte of it is
//!   buffered or decoded ([`MAX_DATA_MSG`] for `Data`, [`MAX_CONTROL_MSG`] for
//!   everything else).
//! - `Data` payloads are never copied: the decoder recognises the canonical
//!   `Frame{Data{Bytes}}` header and hands out slices of the input `Bytes`,
//!   even when one message spans many HTTP/2 DATA frames.
//! - The encoder writes a Data header into headroom in front of the payload,
//!   so a Data message goes out as one `Bytes`.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;

use super::pb;

/// Length of the gRPC message prefix (flag + u32 length).
pub const PREFIX_LEN: usize = 5;
/// Largest non-Data message accepted (DialRequest, control messages).
pub const MAX_CONTROL_MSG: usize = 1 << 20;
/// Largest message on an `Agent/Control` stream (proxy set, strategy, hello).
pub const MAX_CONTROL_STREAM_MSG: usize = 64 << 10;
/// Largest Data message accepted (Teleport caps at 16 KiB; we accept more).
pub const MAX_DATA_MSG: usize = 16 << 20;
/// Bytes of headroom in front of a payload that [`DataBuf`] reserves.
pub const DATA_HEADROOM: usize = PREFIX_LEN + 1 + 5 + 1 + 5;

/// A framing error. It becomes an [`Error`](super::error::Error) (code and
/// metric label) through the one `From` conversion in `wire::error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The compressed flag was set.
    #[error("compressed gRPC messages are not supported")]
    Compressed,
    /// A message exceeded its size limit.
    #[error("message of {0} bytes exceeds the limit of {1} bytes")]
    TooLarge(usize, usize),
    /// A message did not decode as the expected type.
    #[error("malformed protobuf message")]
    Malformed,
    /// The stream ended inside a message.
    #[error("stream ended inside a gRPC message")]
    Truncated,
}

/// One decoded item of a Frame stream.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// A piece of a Data payload (a slice of the input, not a copy).
    Data(Bytes),
    /// A whole non-Data frame.
    Frame(pb::Frame),
}

enum State {
    Prefix,
    Head { msg_len: usize },
    Payload { remaining: usize },
    Body { msg_len: usize },
}

/// Incremental decoder of a gRPC stream of `proto.Frame` messages.
pub struct FrameDecoder {
    chunk: Bytes,
    state: State,
    hdr: [u8; 16],
    hdr_len: usize,
    body: BytesMut,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

enum Head {
    NeedMore,
    Data(usize),
    Other,
}

fn read_varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

fn varint_len(v: u64) -> usize {
    prost::encoding::encoded_len_varint(v)
}

/// Recognises the canonical header `0x1a len(Data) 0x0a len(bytes)`.
fn parse_head(h: &[u8], msg_len: usize) -> Head {
    if h[0] != 0x1a {
        return Head::Other;
    }
    let Some((l1, p)) = read_varint(&h[1..]) else {
        return if h.len() >= 7 || h.len() == msg_len { Head::Other } else { Head::NeedMore };
    };
    let l1 = l1 as usize;
    if 1 + p + l1 != msg_len {
        return Head::Other;
    }
    if l1 == 0 {
        return Head::Data(0);
    }
    let rest = &h[1 + p..];
    if rest.is_empty() {
        return Head::NeedMore;
    }
    if rest[0] != 0x0a {
        return Head::Other;
    }
    match read_varint(&rest[1..]) {
        Some((n, q)) if 1 + q + n as usize == l1 => Head::Data(n as usize),
        Some(_) => Head::Other,
        None if rest.len() >= 7 || h.len() == msg_len => Head::Other,
        None => Head::NeedMore,
    }
}

impl FrameDecoder {
    /// A decoder at a message boundary.
    pub fn new() -> Self {
        FrameDecoder { chunk: Bytes::new(), state: State::Prefix, hdr: [0; 16], hdr_len: 0, body: BytesMut::new() }
    }

    /// Feeds the next chunk. Call [`decode_next`](Self::decode_next) until it returns
    /// `Ok(None)` before pushing again.
    pub fn push(&mut self, chunk: Bytes) {
        debug_assert!(self.chunk.is_empty(), "push before the previous chunk was drained");
        self.chunk = chunk;
    }

    /// Whether the decoder stands at a message boundary with nothing buffered.
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, State::Prefix) && self.hdr_len == 0
    }

    /// Takes the undecoded rest of the current chunk. Only meaningful at a
    /// message boundary: what is returned starts with a gRPC prefix.
    pub fn take_rest(&mut self) -> Bytes {
        std::mem::take(&mut self.chunk)
    }

    /// Checks that the stream ended at a message boundary.
    pub fn finish(&self) -> Result<(), CodecError> {
        if self.at_boundary() && self.chunk.is_empty() {
            Ok(())
        } else {
            Err(CodecError::Truncated)
        }
    }

    /// The next event decodable from what was pushed, `Ok(None)` when more
    /// input is needed.
    pub fn decode_next(&mut self) -> Result<Option<Event>, CodecError> {
        loop {
            match self.state {
                State::Payload { remaining } => {
                    if remaining == 0 {
                        self.state = State::Prefix;
                        continue;
                    }
                    if self.chunk.is_empty() {
                        return Ok(None);
                    }
                    let take = remaining.min(self.chunk.len());
                    let out = self.chunk.split_to(take);
                    self.state = State::Payload { remaining: remaining - take };
                    return Ok(Some(Event::Data(out)));
                }
                _ if self.chunk.is_empty() => return Ok(None),
                State::Prefix => {
                    let take = (PREFIX_LEN - self.hdr_len).min(self.chunk.len());
                    self.hdr[self.hdr_len..self.hdr_len + take].copy_from_slice(&self.chunk[..take]);
                    self.hdr_len += take;
                    let _ = self.chunk.split_to(take);
                    if self.hdr_len < PREFIX_LEN {
                        return Ok(None);
                    }
                    self.hdr_len = 0;
                    if self.hdr[0] != 0 {
                        return Err(CodecError::Compressed);
                    }
                    let msg_len = u32::from_be_bytes([self.hdr[1], self.hdr[2], self.hdr[3], self.hdr[4]]) as usize;
                    if msg_len > MAX_DATA_MSG + 16 {
                        return Err(CodecError::TooLarge(msg_len, MAX_DATA_MSG));
                    }
                    if msg_len == 0 {
                        return Ok(Some(Event::Frame(pb::Frame::default())));
                    }
                    self.state = State::Head { msg_len };
                }
                State::Head { msg_len } => {
                    self.hdr[self.hdr_len] = self.chunk[0];
                    self.hdr_len += 1;
                    let _ = self.chunk.split_to(1);
                    match parse_head(&self.hdr[..self.hdr_len], msg_len) {
                        Head::NeedMore if self.hdr_len < msg_len => {}
                        Head::Data(n) => {
                            self.hdr_len = 0;
                            self.state = State::Payload { remaining: n };
                        }
                        Head::NeedMore | Head::Other => {
                            if msg_len > MAX_CONTROL_MSG {
                                return Err(CodecError::TooLarge(msg_len, MAX_CONTROL_MSG));
                            }
                            self.body.clear();
                            self.body.reserve(msg_len);
                            self.body.extend_from_slice(&self.hdr[..self.hdr_len]);
                            self.hdr_len = 0;
                            self.state = State::Body { msg_len };
                        }
                    }
                }
                State::Body { msg_len } => {
                    let take = (msg_len - self.body.len()).min(self.chunk.len());
                    self.body.extend_from_slice(&self.chunk.split_to(take));
                    if self.body.len() < msg_len {
                        return Ok(None);
                    }
                    self.state = State::Prefix;
                    let frame = pb::Frame::decode(self.body.split().freeze()).map_err(|_| CodecError::Malformed)?;
                    if let Some(pb::frame::Message::Data(d)) = frame.message {
                        // A non-canonical Data encoding: still just payload.
                        if d.bytes.is_empty() {
                            continue;
                        }
                        return Ok(Some(Event::Data(d.bytes)));
                    }
                    return Ok(Some(Event::Frame(frame)));
                }
            }
        }
    }
}

/// Incremental decoder of a gRPC stream of small whole messages (control
/// streams), each at most `limit` bytes.
pub struct MsgDecoder {
    buf: BytesMut,
    limit: usize,
}

impl MsgDecoder {
    /// A decoder with a per-message limit.
    pub fn new(limit: usize) -> Self {
        MsgDecoder { buf: BytesMut::new(), limit }
    }

    /// Appends input.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next whole message, decoded as `M`.
    pub fn decode_next<M: Message + Default>(&mut self) -> Result<Option<M>, CodecError> {
        if self.buf.len() < PREFIX_LEN {
            return Ok(None);
        }
        if self.buf[0] != 0 {
            return Err(CodecError::Compressed);
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > self.limit {
            return Err(CodecError::TooLarge(len, self.limit));
        }
        if self.buf.len() < PREFIX_LEN + len {
            return Ok(None);
        }
        let _ = self.buf.split_to(PREFIX_LEN);
        let msg = self.buf.split_to(len).freeze();
        M::decode(msg).map(Some).map_err(|_| CodecError::Malformed)
    }
}

/// Encodes one message with its gRPC prefix.
pub fn encode_msg<M: Message>(m: &M) -> Bytes {
    let len = m.encoded_len();
    let mut b = BytesMut::with_capacity(PREFIX_LEN + len);
    b.put_u8(0);
    b.put_u32(len as u32);
    m.encode(&mut b).expect("BytesMut grows");
    b.freeze()
}

/// Writes the prefix and `Frame{Data{Bytes}}` header for an `n`-byte payload
/// so that it ends exactly at `out.len()`; returns the header length.
pub fn write_data_header(n: usize, out: &mut [u8]) -> usize {
    let l1 = 1 + varint_len(n as u64) + n;
    let msg_len = 1 + varint_len(l1 as u64) + l1;
    let h = PREFIX_LEN + msg_len - n;
    let start = out.len() - h;
    let mut w = &mut out[start..];
    w.put_u8(0);
    w.put_u32(msg_len as u32);
    w.put_u8(0x1a);
    prost::encoding::encode_varint(l1 as u64, &mut w);
    w.put_u8(0x0a);
    prost::encoding::encode_varint(n as u64, &mut w);
    h
}

/// Encodes a Data message by copying `payload` (for small, cold-path writes).
pub fn encode_data(payload: &[u8]) -> Bytes {
    let mut head = [0u8; DATA_HEADROOM];
    let h = write_data_header(payload.len(), &mut head);
    let mut b = BytesMut::with_capacity(h + payload.len());
    b.extend_from_slice(&head[DATA_HEADROOM - h..]);
    b.extend_from_slice(payload);
    b.freeze()
}

/// A read buffer with headroom for a Data header: read into
/// [`spare`](Self::spare), then [`commit`](Self::commit) turns the bytes read
/// into one framed `Bytes` without copying the payload.
///
/// Memory is zero-filled once per allocation, not once per read: a 64-byte
/// read consumes 64 bytes plus headroom of an initialised region and leaves
/// the rest for the next read. Allocations start small ([`FIRST_ALLOC`]), so
/// an idle connection (an SSH session waiting for a key press) holds 16 KiB,
/// and double whenever a read fills what it was offered, up to four chunks,
/// so bulk transfers still read a whole chunk at a time. (Alternatives
/// rejected: reading into uninitialised capacity, which needs `unsafe` and a
/// reader that promises never to read the buffer, and glommio's `read` does
/// not; a fixed four-chunk buffer, 256 KiB per idle connection.)
pub struct DataBuf {
    buf: BytesMut,
    chunk: usize,
    alloc: usize,
    offered: usize,
    growing: bool,
}

/// The least space a read is offered before a fresh buffer is taken.
const MIN_SPARE: usize = 4 << 10;
/// The first allocation of a [`DataBuf`].
pub const FIRST_ALLOC: usize = 16 << 10;

impl DataBuf {
    /// A buffer that reads up to `chunk` bytes at a time.
    pub fn new(chunk: usize) -> Self {
        DataBuf { buf: BytesMut::new(), chunk, alloc: Self::first(), offered: 0, growing: true }
    }

    fn first() -> usize {
        FIRST_ALLOC.max(DATA_HEADROOM + MIN_SPARE)
    }

    /// Space to read the next payload into (up to `chunk` bytes).
    pub fn spare(&mut self) -> &mut [u8] {
        self.spare_fresh().0
    }

    /// [`spare`](Self::spare), and the bytes it newly allocated (0 when it
    /// reused the buffer), for a memory meter.
    pub fn spare_fresh(&mut self) -> (&mut [u8], usize) {
        let mut fresh = 0;
        if self.buf.len() < DATA_HEADROOM + MIN_SPARE.min(self.chunk) {
            self.buf = BytesMut::zeroed(self.alloc);
            fresh = self.alloc;
        }
        let end = self.buf.len().min(DATA_HEADROOM + self.chunk);
        self.offered = end - DATA_HEADROOM;
        (&mut self.buf[DATA_HEADROOM..end], fresh)
    }

    /// Allows (the default) or stops growth; stopped, the next allocation
    /// is the first size again (a memory budget's soft level).
    pub fn set_growing(&mut self, on: bool) {
        self.growing = on;
        if !on {
            self.alloc = Self::first();
        }
    }

    /// Drops the space held for the next read; the allocation goes back once
    /// the payloads cut from it are gone too.
    pub fn shed(&mut self) {
        self.buf = BytesMut::new();
    }

    /// Bytes allocated for reading now (a memory figure).
    pub fn allocated(&self) -> usize {
        self.buf.capacity()
    }

    /// Frames the first `n` bytes of the last [`spare`](Self::spare) as one
    /// gRPC Data message.
    pub fn commit(&mut self, n: usize) -> Bytes {
        if n == self.offered && self.growing {
            // The read filled its space: more is coming, read more at once.
            self.alloc = (self.alloc * 2).min((DATA_HEADROOM + self.chunk) * 4);
        }
        let h = write_data_header(n, &mut self.buf[..DATA_HEADROOM]);
        let mut framed = self.buf.split_to(DATA_HEADROOM + n);
        let _ = framed.split_to(DATA_HEADROOM - h);
        framed.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn decode_all(input: &[Bytes]) -> Result<(Vec<u8>, Vec<pb::Frame>), CodecError> {
        let mut d = FrameDecoder::new();
        let (mut data, mut frames) = (Vec::new(), Vec::new());
        for c in input {
            d.push(c.clone());
            while let Some(ev) = d.decode_next()? {
                match ev {
                    Event::Data(b) => data.extend_from_slice(&b),
                    Event::Frame(f) => frames.push(f),
                }
            }
        }
        d.finish()?;
        Ok((data, frames))
    }

    fn stream_of(payloads: &[Vec<u8>]) -> Vec<u8> {
        let mut out = encode_msg(&crate::wire::DialTarget::parse("a/b").unwrap().to_frame()).to_vec();
        for p in payloads {
            out.extend_from_slice(&encode_data(p));
        }
        out.extend_from_slice(&encode_msg(&crate::wire::established_frame()));
        out
    }

    #[test]
    fn canonical_data_matches_prost_encoding() {
        for n in [1usize, 127, 128, 16383, 16384, 70000] {
            let payload = vec![7u8; n];
            let f = pb::Frame { message: Some(pb::frame::Message::Data(pb::Data { bytes: payload.clone().into() })) };
            assert_eq!(encode_data(&payload), encode_msg(&f), "n={n}");
        }
    }

    #[test]
    fn any_chunking_yields_the_same_stream() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let payloads: Vec<Vec<u8>> =
            (0..40).map(|i| (0..rng.gen_range(0..3000 * (i % 3 + 1))).map(|_| rng.gen()).collect()).collect();
        let wire = stream_of(&payloads);
        let expect: Vec<u8> = payloads.concat();
        for _ in 0..50 {
            let mut chunks = Vec::new();
            let mut i = 0;
            while i < wire.len() {
                let n = rng.gen_range(1..64).min(wire.len() - i);
                chunks.push(Bytes::copy_from_slice(&wire[i..i + n]));
                i += n;
            }
            let (data, frames) = decode_all(&chunks).unwrap();
            assert_eq!(data, expect);
            assert_eq!(frames.len(), 2);
        }
    }

    #[test]
    fn data_payloads_are_slices_of_the_input() {
        let wire = Bytes::from(encode_data(&[9u8; 4096]).to_vec());
        let mut d = FrameDecoder::new();
        d.push(wire.clone());
        let Some(Event::Data(b)) = d.decode_next().unwrap() else { panic!() };
        assert_eq!(b.len(), 4096);
        assert_eq!(b.as_ptr(), wire[wire.len() - 4096..].as_ptr());
    }

    #[test]
    fn oversized_and_malformed_messages_are_refused() {
        let mut huge = vec![0u8, 0xff, 0xff, 0xff, 0xff];
        huge.push(0x1a);
        assert!(matches!(decode_all(&[huge.into()]), Err(CodecError::TooLarge(..))));
        // A 2 MiB non-Data message exceeds the control limit before buffering.
        let mut big = vec![0u8];
        big.extend_from_slice(&(2u32 << 20).to_be_bytes());
        big.push(0x0a);
        assert!(matches!(decode_all(&[big.into()]), Err(CodecError::TooLarge(_, MAX_CONTROL_MSG))));
        assert_eq!(decode_all(&[Bytes::from_static(&[1, 0, 0, 0, 1, 0])]), Err(CodecError::Compressed));
        assert_eq!(decode_all(&[Bytes::from_static(&[0, 0, 0, 0, 2, 0xff, 0xff])]), Err(CodecError::Malformed));
        assert_eq!(decode_all(&[Bytes::from_static(&[0, 0, 0, 0, 9, 0x1a])]), Err(CodecError::Truncated));
    }

    #[test]
    fn data_buf_frames_without_copying() {
        let mut b = DataBuf::new(1024);
        b.spare()[..5].copy_from_slice(b"hello");
        let framed = b.commit(5);
        assert_eq!(framed, encode_data(b"hello"));
        b.spare()[..3].copy_from_slice(b"abc");
        let second = b.commit(3);
        assert_eq!(second, encode_data(b"abc"));
        // Both frames are views of one allocation: no zero-fill or copy in
        // between reads.
        let gap = second.as_ptr() as usize - framed.as_ptr() as usize;
        assert!(gap < 64, "second frame starts {gap} bytes after the first");
        assert_eq!(b.spare().len(), 1024, "a read is offered a whole chunk");
    }

    #[test]
    fn data_buf_starts_small_and_grows_for_bulk_reads() {
        let mut b = DataBuf::new(64 << 10);
        let first = b.spare().len();
        assert!(b.allocated() <= FIRST_ALLOC + 64, "an idle connection holds {} bytes", b.allocated());
        // Reads that fill what they were offered double the next allocation.
        let mut offered = first;
        for _ in 0..12 {
            let n = b.spare().len();
            offered = offered.max(n);
            let _ = b.commit(n);
        }
        assert_eq!(offered, 64 << 10, "bulk reads reach a whole chunk");
        assert!(b.allocated() <= 4 * ((64 << 10) + DATA_HEADROOM));
    }

    #[test]
    fn data_buf_past_a_soft_level_keeps_its_first_size_and_sheds() {
        let mut b = DataBuf::new(64 << 10);
        b.set_growing(false);
        let mut fresh = 0;
        for _ in 0..12 {
            let (s, f) = b.spare_fresh();
            let n = s.len();
            fresh = fresh.max(f);
            let _ = b.commit(n);
        }
        assert!(fresh <= FIRST_ALLOC.max(DATA_HEADROOM + MIN_SPARE), "allocated {fresh} bytes at once");
        b.shed();
        assert_eq!(b.allocated(), 0, "a shed buffer holds nothing");
        b.set_growing(true);
        let (_, f) = b.spare_fresh();
        assert!(f > 0, "the next read allocates again");
    }

    #[test]
    fn msg_decoder_enforces_limit() {
        let m = encode_msg(&crate::wire::established_frame());
        let mut d = MsgDecoder::new(16);
        d.push(&m);
        assert_eq!(d.decode_next::<pb::Frame>().unwrap(), Some(crate::wire::established_frame()));
        let mut d = MsgDecoder::new(1);
        d.push(&encode_data(b"xyz"));
        assert!(matches!(d.decode_next::<pb::Frame>(), Err(CodecError::TooLarge(..))));
    }
}
