import BlockStore
import Crypto
import Glibc
import NIOCore
import PeerProtocol

/// The primary's side of one `syncCompare` request: reads the compared range of its device and
/// returns the messages that make the replica's chunks equal to it, the differing chunks as
/// slices of what was read (no copy on the way to the socket), zero chunks as lengths.
struct SyncComparison: Sendable {
    /// How much is read at once, and the most data one `syncData` carries (well inside a frame).
    static let readSize = 1 << 20
    /// The largest chunk a replica may ask for: one read.
    static let maxChunkSize = UInt32(readSize)

    let request: SyncCompare
    /// The device's size: chunks beyond it are not compared.
    let size: UInt64
    /// The device, for its holes (which need no reading); nil: read everything.
    let device: BlockDevice?
    let allocator: ByteBufferAllocator
    let read: @Sendable (UnsafeMutableRawBufferPointer, UInt64) throws(SystemError) -> Int

    init(
        request: SyncCompare, size: UInt64, device: BlockDevice?, allocator: ByteBufferAllocator,
        read: @escaping @Sendable (UnsafeMutableRawBufferPointer, UInt64) throws(SystemError) -> Int
    ) {
        self.request = request
        self.size = size
        self.device = device
        self.allocator = allocator
        self.read = read
    }

    func differences() throws(ReplicationError) -> [PeerMessage] {
        let chunk = Int(request.chunkSize)
        let chunksPerRead = max(1, Self.readSize / chunk)
        var run = DifferingRun(resource: request.resource)
        var index = 0
        while index < request.digests.count {
            let start = request.offset + UInt64(index) * UInt64(chunk)
            guard start < size else { break }
            let chunks = min(chunksPerRead, request.digests.count - index)
            let length = Int(min(UInt64(chunks * chunk), size - start))
            if let device, device.isHole(offset: start, length: UInt64(length)) {
                forEachChunk(from: index, length: length) { digestIndex, position, count in
                    if request.digests[digestIndex] == ChunkDigest.zero(count: count) {
                        run.flush()
                    } else {
                        run.addZeroes(at: start + UInt64(position), count: count)
                    }
                }
            } else {
                let bytes: ByteBuffer
                do {
                    bytes = try ByteBuffer.reading(count: length, allocator: allocator) { buffer throws(SystemError) in try read(buffer, start) }
                } catch {
                    throw ReplicationError("cannot read the data device at \(start): \(error)")
                }
                guard bytes.readableBytes == length else {
                    throw ReplicationError("the data device ended early at \(start + UInt64(bytes.readableBytes))")
                }
                run.startRead(bytes, at: start)
                forEachChunk(from: index, length: length) { digestIndex, position, count in
                    let replicaIsZero = request.digests[digestIndex] == ChunkDigest.zero(count: count)
                    let (isZero, equal) = bytes.withUnsafeReadableBytes { raw in
                        let chunkBytes = UnsafeRawBufferPointer(rebasing: raw[position..<position + count])
                        let isZero = ChunkDigest.isZero(chunkBytes)
                        // Hashed only where the replica has data: against an empty replica a chunk
                        // differs exactly when it is not zero.
                        return (isZero, isZero ? replicaIsZero : !replicaIsZero && ChunkDigest.of(chunkBytes) == request.digests[digestIndex])
                    }
                    if equal {
                        run.flush()
                    } else if isZero {
                        run.addZeroes(at: start + UInt64(position), count: count)
                    } else {
                        run.addData(at: position, count: count)
                    }
                }
            }
            index += chunks
        }
        run.flush()
        return run.messages
    }

    /// Calls `body(digest index, position in the read, byte count)` for each chunk of a read.
    private func forEachChunk(from first: Int, length: Int, _ body: (Int, Int, Int) -> Void) {
        let chunk = Int(request.chunkSize)
        var position = 0
        var digestIndex = first
        while position < length {
            let count = min(chunk, length - position)
            body(digestIndex, position, count)
            position += count
            digestIndex += 1
        }
    }
}

/// Consecutive chunks an initial sync sends, gathered into as few messages as possible: data up
/// to one read (a slice of it), zeroes of any length.
struct DifferingRun {
    let resource: String
    private(set) var messages: [PeerMessage] = []
    /// The current read and the device offset of its first byte.
    private var read = ByteBuffer()
    private var readOffset: UInt64 = 0
    /// The run being gathered: `dataCount` bytes of the read from `dataStart`, or zeroes from `zeroStart`.
    private var dataStart = 0
    private var dataCount = 0
    private var zeroStart: UInt64 = 0
    private var zeroes: UInt64 = 0

    init(resource: String) {
        self.resource = resource
    }

    /// Data runs do not cross reads; zero runs do.
    mutating func startRead(_ bytes: ByteBuffer, at offset: UInt64) {
        flushData()
        read = bytes
        readOffset = offset
    }

    /// `count` bytes of the current read from `indexInRead`.
    mutating func addData(at indexInRead: Int, count: Int) {
        flushZeroes()
        if dataCount > 0 && dataStart + dataCount != indexInRead { flushData() }
        if dataCount == 0 { dataStart = indexInRead }
        dataCount += count
    }

    mutating func addZeroes(at offset: UInt64, count: Int) {
        flushData()
        if zeroes > 0 && zeroStart + zeroes != offset { flushZeroes() }
        if zeroes == 0 { zeroStart = offset }
        zeroes += UInt64(count)
    }

    /// The previous chunk was equal: it ends the run.
    mutating func flush() {
        flushData()
        flushZeroes()
    }

    private mutating func flushData() {
        guard dataCount > 0 else { return }
        let offset = readOffset + UInt64(dataStart)
        messages.append(.syncData(SyncData(resource: resource, offset: offset, bytes: read.getSlice(at: read.readerIndex + dataStart, length: dataCount)!)))
        dataCount = 0
    }

    private mutating func flushZeroes() {
        guard zeroes > 0 else { return }
        messages.append(.syncZero(SyncZero(resource: resource, offset: zeroStart, length: zeroes)))
        zeroes = 0
    }
}

/// The digest of a device chunk an initial sync compares: SHA-256, first 16 bytes (swift-crypto:
/// 1.3x the project's own SHA-256 on 64 KiB, BENCHMARKS.md). Zero chunks (holes, or read as zeroes)
/// get the zero digest without hashing: an empty replica costs a lookup per chunk, not a hash.
public enum ChunkDigest {
    public static func of(_ bytes: UnsafeRawBufferPointer) -> [UInt8] {
        if isZero(bytes) { return zero(count: bytes.count) }
        return Array(SHA256.hash(data: bytes).prefix(16))
    }

    public static func of(_ bytes: [UInt8]) -> [UInt8] {
        bytes.withUnsafeBytes { of($0) }
    }

    /// The digest of `count` zero bytes.
    public static func zero(count: Int) -> [UInt8] {
        if count == standardZero.count { return standardZero.digest }
        return Array(SHA256.hash(data: [UInt8](repeating: 0, count: count)).prefix(16))
    }

    /// Whether every byte is zero: memcmp against the shared zero block (vectorized in libc).
    static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        let zeroes = ZeroBlock.shared
        var position = 0
        while position < bytes.count {
            let count = min(zeroes.size, bytes.count - position)
            if memcmp(bytes.baseAddress! + position, zeroes.address, count) != 0 { return false }
            position += count
        }
        return true
    }

    private static let standardZero = (
        count: SyncChunk.size, digest: Array(SHA256.hash(data: [UInt8](repeating: 0, count: SyncChunk.size)).prefix(16))
    )
}

/// The chunk size of an initial sync.
public enum SyncChunk {
    public static let size = 64 << 10
}

extension BlockDevice {
    /// Whether `[offset, offset+length)` is a hole (reads as zeroes without being read).
    func isHole(offset: UInt64, length: UInt64) -> Bool {
        let runs = allocationRuns(offset: offset, length: length, maxRuns: 1)
        return runs.count == 1 && runs[0].isHole && runs[0].length >= length
    }
}

extension ByteBuffer {
    /// A new buffer holding what `read` puts into `count` bytes of room (it returns how many).
    static func reading(
        count: Int, allocator: ByteBufferAllocator, _ read: (UnsafeMutableRawBufferPointer) throws(SystemError) -> Int
    ) throws(SystemError) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: count)
        var failure: SystemError?
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: count) { room in
            do throws(SystemError) {
                return try read(UnsafeMutableRawBufferPointer(rebasing: room[..<count]))
            } catch {
                failure = error
                return 0
            }
        }
        if let failure { throw failure }
        return buffer
    }
}
