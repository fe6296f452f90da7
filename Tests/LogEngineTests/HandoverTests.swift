import BlockStore
import TestSupport
import Testing
import TransactionLog

@testable import LogEngine

#if canImport(Glibc)
import Glibc
#endif

/// Opens `resource`'s log directory as a replica's (a primary that handed over, docs/handover.md §3.2).
func openAsReplica(_ resource: SimulatedResource) throws -> ReplicaLog {
    try ReplicaLog.open(
        directory: resource.disk.directory("mars"), device: resource.device(), deviceSize: resource.deviceSize, replayPaused: false,
        batchBytes: 4096
    )
}

/// Sends `record` to `log` at its fetch position (with the LSN that position has) and commits it.
func append(_ record: LogRecord, to log: ReplicaLog) throws {
    var record = record
    record.lsn = log.status.fetchedLSN
    let position = try #require(log.fetchPosition)
    try log.receive(segment: position.segment, offset: position.offset, bytes: record.encoded())
    try log.commit()
}

@Suite struct HandoverTests {
    /// A primary's directory, after a clean shutdown or a power loss, opens as a replica that replays
    /// what the device lacks and takes the next record of the same history, but not one of another
    /// epoch: the position file carries the engine's epoch (docs/handover.md §1.2).
    @Test(arguments: [false, true]) func aPrimaryDirectoryOpensAsAReplica(powerLoss: Bool) throws {
        let resource = try SimulatedResource()
        let engine = try resource.open()
        let target = Completions()
        for index in 0..<12 {
            let bytes = [UInt8](repeating: UInt8(index + 1), count: 1024)
            _ = engine.submit(offset: UInt64(index) * 4096, change: .write(bytes), fua: false, target: target, token: index)
        }
        if powerLoss {
            #expect(engine.flush(target: target, token: 100) == .waiting)
            #expect(target.wait(100) == nil)
            resource.disk.powerLoss(.dropUnsynced)
            engine.halt()
        } else {
            #expect(engine.shutdown().isComplete)
        }
        let log = try openAsReplica(resource)
        defer { log.shutdown() }
        waitForReplay(log, to: log.status.fetchedLSN)
        try append(write(0, 0xAA, epoch: 1), to: log)
        waitForReplay(log, to: log.status.fetchedLSN)
        #expect(log.status.failure == nil)
        let device = try resource.device()
        #expect(try device.read(count: 2, at: 0) == [0xAA, 0xAA])
        for index in 1..<12 { #expect(try device.read(count: 1, at: UInt64(index) * 4096) == [UInt8(index + 1)]) }
        #expect(throws: ReplicaLogError.self) { try append(write(4096, 0xBB, epoch: 2), to: log) }
        #expect(log.status.fork != nil)
    }
}
