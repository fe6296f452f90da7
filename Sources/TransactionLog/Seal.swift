/// A seal record where a history has it: the primary of `epoch` ended it at `endLSN`, the last
/// record of `segment`, promising `nextEpoch` to its successor.
public struct Seal: Sendable, Equatable {
    public var segment: SegmentName
    public var epoch: UInt64
    public var nextEpoch: UInt64
    /// The LSN after the seal: where the successor's segment starts.
    public var endLSN: UInt64

    public init(segment: SegmentName, epoch: UInt64, nextEpoch: UInt64, endLSN: UInt64) {
        self.segment = segment
        self.epoch = epoch
        self.nextEpoch = nextEpoch
        self.endLSN = endLSN
    }
}

/// The rules of a seal (docs/log-format.md, "The seal"), checked record by record by every reader
/// of a history: after a seal the next record must be an epoch record of at least the promised
/// epoch, in a later segment (a seal is the last record of its segment). Anything else after a
/// seal is a fork: a primary that wrote on after it handed over (invariant 4).
public struct SealRule: Sendable, Equatable {
    /// The seal the history read so far ends with: the next record must answer it.
    public private(set) var pending: Seal?

    public init(pending: Seal? = nil) {
        self.pending = pending
    }

    /// Takes `record`, the next record of the history, found in `segment`. Returns why it breaks the
    /// rules (a fork), or nil.
    public mutating func check(_ record: LogRecord, in segment: SegmentName) -> String? {
        if let seal = pending {
            if segment == seal.segment {
                return "a \(record.type) record of epoch \(record.epoch) after the seal of epoch \(seal.epoch) at LSN \(seal.endLSN) "
                    + "in the same segment: the sealed primary wrote on after it handed over"
            }
            guard record.type == .epoch, record.epoch >= seal.nextEpoch else {
                return "a \(record.type) record of epoch \(record.epoch) after the seal of epoch \(seal.epoch) at LSN \(seal.endLSN), "
                    + "which promised epoch \(seal.nextEpoch): the history after a seal must start with an epoch record of at least that epoch"
            }
            pending = nil
        }
        if let nextEpoch = record.promisedEpoch {
            pending = Seal(segment: segment, epoch: record.epoch, nextEpoch: nextEpoch, endLSN: record.lsn + UInt64(record.encodedSize))
        }
        return nil
    }
}
