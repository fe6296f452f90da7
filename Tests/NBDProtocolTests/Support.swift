import NIOCore
import TestSupport

#if canImport(Glibc)
import Glibc
#endif

@testable import NBDProtocol

let disk = ExportDescriptor(name: "disk", description: "test disk", size: 1 << 20, readOnly: false)
let backup = ExportDescriptor(name: "backup", description: "read-only", size: 4096, readOnly: true)

func option(_ code: UInt32, _ payload: [UInt8] = [], magic: UInt64 = NBDMagic.option) -> ByteBuffer {
    var buffer = ByteBuffer()
    buffer.writeInteger(magic)
    buffer.writeInteger(code)
    buffer.writeInteger(UInt32(payload.count))
    buffer.writeBytes(payload)
    return buffer
}

func option(_ code: NBDOption, _ payload: [UInt8] = []) -> ByteBuffer {
    option(code.rawValue, payload)
}

/// The payload of INFO/GO: name, then information requests.
func infoPayload(_ name: String, requests: [NBDInfoType] = []) -> [UInt8] {
    var buffer = ByteBuffer()
    buffer.writeInteger(UInt32(name.utf8.count))
    buffer.writeString(name)
    buffer.writeInteger(UInt16(requests.count))
    for request in requests { buffer.writeInteger(request.rawValue) }
    return Array(buffer.readableBytesView)
}

func metaPayload(_ name: String, queries: [String]) -> [UInt8] {
    var buffer = ByteBuffer()
    buffer.writeInteger(UInt32(name.utf8.count))
    buffer.writeString(name)
    buffer.writeInteger(UInt32(queries.count))
    for query in queries {
        buffer.writeInteger(UInt32(query.utf8.count))
        buffer.writeString(query)
    }
    return Array(buffer.readableBytesView)
}

func clientFlags(_ flags: UInt32 = NBDClientFlag.fixedNewstyle | NBDClientFlag.noZeroes) -> ByteBuffer {
    var buffer = ByteBuffer()
    buffer.writeInteger(flags)
    return buffer
}

/// One option reply as parsed from server output.
struct OptionReply: Equatable {
    var option: UInt32
    var type: UInt32
    var payload: [UInt8]

    var typeName: NBDOptionReply? { NBDOptionReply(rawValue: type) }
}

func parseReplies(_ buffer: ByteBuffer) -> [OptionReply] {
    var buffer = buffer
    var replies: [OptionReply] = []
    while buffer.readableBytes >= 20 {
        let magic = buffer.readInteger(as: UInt64.self)!
        precondition(magic == NBDMagic.optionReply, "bad reply magic")
        let option = buffer.readInteger(as: UInt32.self)!
        let type = buffer.readInteger(as: UInt32.self)!
        let length = buffer.readInteger(as: UInt32.self)!
        replies.append(OptionReply(option: option, type: type, payload: buffer.readBytes(length: Int(length))!))
    }
    precondition(buffer.readableBytes == 0, "trailing bytes in reply")
    return replies
}

/// Runs the machine over `input` until it needs data or ends; collects every action.
func drive(_ machine: inout HandshakeStateMachine, _ input: inout ByteBuffer) -> [HandshakeAction] {
    var actions: [HandshakeAction] = []
    while true {
        let action = machine.receive(&input)
        actions.append(action)
        switch action {
        case .send: continue
        default: return actions
        }
    }
}

func request(
    _ type: UInt16, flags: NBDCommandFlags = [], cookie: UInt64 = 7, offset: UInt64 = 0, length: UInt32 = 512,
    payload: [UInt8]? = nil, magic: UInt32 = NBDMagic.request
) -> ByteBuffer {
    var buffer = ByteBuffer()
    buffer.writeInteger(magic)
    buffer.writeInteger(flags.rawValue)
    buffer.writeInteger(type)
    buffer.writeInteger(cookie)
    buffer.writeInteger(offset)
    buffer.writeInteger(length)
    if let payload { buffer.writeBytes(payload) }
    return buffer
}

