/// A resize that cannot be done as asked, in words that say what to do instead.
public struct ResizeRefusal: Error, Equatable, CustomStringConvertible {
    public let description: String

    public init(_ description: String) {
        self.description = description
    }
}

/// The rule for which size a resource has, in one place (MARS's `resize`, Appendix B of its
/// manual): the primary's resource entry holds the logical size every host serves and replays, and
/// the size a resize wants. Growing is two-phase. Every member first grows its data device and
/// copies the new tail from the primary's device, while no client can write there yet (the tail
/// is static, so the copy is exact and no replay is needed on top of it), and says how far its
/// device is ready. Only when every member is ready does the primary raise the logical size;
/// from then on, writes to the tail reach the members through the log, in order, like any other.
/// Shrinking is refused unless forced; a forced shrink only lowers the logical size (no device
/// shrinks, and bytes beyond it stay where they are).
public enum ResourceSize {
    /// What a resize asked on the primary does.
    public enum Change: Equatable, Sendable {
        case grow
        /// Forced: the logical size goes down at once.
        case shrink
        case unchanged
    }

    /// Checks a resize of `resource` from `current` to `wanted` bytes.
    public static func change(of resource: String, from current: UInt64, to wanted: UInt64, force: Bool) throws(ResizeRefusal) -> Change {
        guard wanted > 0 else { throw ResizeRefusal("a resource needs a size above 0 bytes") }
        if wanted == current { return .unchanged }
        if wanted > current { return .grow }
        guard force else {
            throw ResizeRefusal(
                "resource \(resource) has \(current) bytes; \(wanted) would shrink it, which cuts off whatever its users keep "
                    + "beyond that: shrink the filesystem first, then resize with --force (the data devices keep their size)"
            )
        }
        return .shrink
    }

    /// What the primary does with a pending resize.
    public enum Settlement: Equatable, Sendable {
        /// Serve (and replay within) this logical size from now on.
        case settled(UInt64)
        /// These members (sorted) are not ready for the wanted size yet.
        case waiting(for: [String])
    }

    /// `ready`: for every member (the primary included), the size up to which its data device
    /// has the capacity and holds the primary's content (by copy or by replay).
    public static func settle(current: UInt64, wanted: UInt64, ready: [String: UInt64]) -> Settlement {
        guard wanted > current else { return .settled(wanted) }
        let lagging = ready.filter { $0.value < wanted }.map(\.key).sorted()
        return lagging.isEmpty ? .settled(wanted) : .waiting(for: lagging)
    }

    /// What a secondary does about a pending resize.
    public enum MemberStep: Equatable, Sendable {
        case nothing
        /// Its data device is smaller than the wanted size.
        case grow(to: UInt64)
        /// Copy the primary's device from `from` to `to` (the new tail, or what is left of it).
        case copyTail(from: UInt64, to: UInt64)
    }

    /// `logical`: the resource's size; `wanted`: what a resize asks (nil: none); `capacity`: the
    /// member's device as it is; `synced`: every byte before it equals the primary's (up to replay).
    public static func memberStep(logical: UInt64, wanted: UInt64?, capacity: UInt64, synced: UInt64) -> MemberStep {
        guard let wanted, wanted > logical else { return .nothing }
        if capacity < wanted { return .grow(to: wanted) }
        if synced < wanted { return .copyTail(from: max(synced, logical), to: wanted) }
        return .nothing
    }

    /// How far a member is ready for a resize: what its device can hold and holds.
    public static func ready(capacity: UInt64, synced: UInt64) -> UInt64 { min(capacity, synced) }
}
