// Package bounded checks that encoded bytes cannot make a decoder allocate
// more than a bound proportional to their own size, before the decoder
// sees them. Bytes in Redis are input: another program, a bug or an
// attacker may have written them.
package bounded

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// ErrTooLong is matched by the error of a msgpack header whose declared
// length cannot fit in the bytes that follow it.
var ErrTooLong = errors.New("declared length exceeds the bytes that follow")

// Msgpack checks the structure of a msgpack document: every array, map,
// string, binary and extension header declares no more elements or bytes
// than remain in data (each element takes at least one byte), no type
// code is invalid, and nothing follows the value. It allocates nothing.
//
// github.com/vmihailenco/msgpack/v5 sizes some slices from the declared
// length before reading the elements (an interface slice, for one): a
// header of 2^32-1 elements in a 45-byte value asks for 64 GiB, and the
// runtime's out-of-memory is fatal. After this check, what a decoder
// allocates is bounded by a constant times len(data).
func Msgpack(data []byte) error { return check(data, false) }

// MsgpackForMaps is Msgpack for values whose Go type holds a map (map[K]V
// anywhere in it). Where msgpack expects such a map it skips an extension
// header and reads a map header from the extension's payload, which
// Msgpack treats as opaque bytes, and the map's entries from whatever
// follows, unchecked. So here an extension whose payload begins with a map
// header is refused as well.
func MsgpackForMaps(data []byte) error { return check(data, true) }

func check(data []byte, maps bool) error {
	rest := data
	need := 1 // values still to read
	for need > 0 {
		if need > len(rest) {
			return fmt.Errorf("msgpack: %d values declared, %d bytes left: %w", need, len(rest), ErrTooLong)
		}
		need--
		c := rest[0]
		rest = rest[1:]
		var n, skip int // elements to add to need; payload bytes to skip
		switch {
		case c <= 0x7f, c >= 0xe0: // positive and negative fixint
		case c <= 0x8f: // fixmap
			n = 2 * int(c&0x0f)
		case c <= 0x9f: // fixarray
			n = int(c & 0x0f)
		case c <= 0xbf: // fixstr
			skip = int(c & 0x1f)
		default:
			var err error
			if n, skip, rest, err = header(c, rest); err != nil {
				return err
			}
		}
		if skip > len(rest) {
			return fmt.Errorf("msgpack: %d bytes declared, %d left: %w", skip, len(rest), ErrTooLong)
		}
		// rest[0] is the extension's type; msgpack, where it expects a
		// map, reads the next code right after it, in the payload or, for
		// an empty payload, past it.
		if maps && isExt(c) && len(rest) > 1 && isMap(rest[1]) {
			return fmt.Errorf("msgpack: extension followed by a map header (0x%02x)", rest[1])
		}
		rest = rest[skip:]
		if n > len(rest) {
			return fmt.Errorf("msgpack: %d elements declared, %d bytes left: %w", n, len(rest), ErrTooLong)
		}
		need += n
	}
	if len(rest) > 0 {
		// msgpack writes one value; bytes after it are read only by a
		// decoder that went astray (an extension skipped where a map was
		// expected), and nothing checked them.
		return fmt.Errorf("msgpack: %d bytes after the value", len(rest))
	}
	return nil
}

// header reads what follows a type code from 0xc0 to 0xdf: the elements
// it adds (n) and the payload bytes to skip.
func header(c byte, rest []byte) (n, skip int, _ []byte, _ error) {
	length := func(size int) (int, []byte, error) {
		if len(rest) < size {
			return 0, nil, fmt.Errorf("msgpack: truncated header of code 0x%02x: %w", c, ErrTooLong)
		}
		var v uint64
		switch size {
		case 1:
			v = uint64(rest[0])
		case 2:
			v = uint64(binary.BigEndian.Uint16(rest))
		case 4:
			v = uint64(binary.BigEndian.Uint32(rest))
		}
		if v > uint64(len(rest)) { // also keeps it within int on every platform
			return 0, nil, fmt.Errorf("msgpack: %d declared, %d bytes left: %w", v, len(rest), ErrTooLong)
		}
		return int(v), rest[size:], nil
	}
	var err error
	switch c {
	case 0xc0, 0xc2, 0xc3: // nil, false, true
	case 0xc1:
		return 0, 0, nil, errors.New("msgpack: invalid type code 0xc1")
	case 0xc4, 0xd9: // bin8, str8
		skip, rest, err = length(1)
	case 0xc5, 0xda: // bin16, str16
		skip, rest, err = length(2)
	case 0xc6, 0xdb: // bin32, str32
		skip, rest, err = length(4)
	case 0xc7: // ext8: a length, then the type byte and the data
		skip, rest, err = length(1)
		skip++
	case 0xc8: // ext16
		skip, rest, err = length(2)
		skip++
	case 0xc9: // ext32
		skip, rest, err = length(4)
		skip++
	case 0xcc, 0xd0: // uint8, int8
		skip = 1
	case 0xcd, 0xd1, 0xd4: // uint16, int16; fixext1 (type byte + 1)
		skip = 2
	case 0xd5: // fixext2
		skip = 3
	case 0xca, 0xce, 0xd2: // float32, uint32, int32
		skip = 4
	case 0xd6: // fixext4
		skip = 5
	case 0xcb, 0xcf, 0xd3: // float64, uint64, int64
		skip = 8
	case 0xd7: // fixext8
		skip = 9
	case 0xd8: // fixext16
		skip = 17
	case 0xdc: // array16
		n, rest, err = length(2)
	case 0xdd: // array32
		n, rest, err = length(4)
	case 0xde: // map16
		n, rest, err = length(2)
		n *= 2
	case 0xdf: // map32
		n, rest, err = length(4)
		n *= 2
	}
	return n, skip, rest, err
}

// isExt reports an extension code: ext8/16/32 and fixext1–16.
func isExt(c byte) bool { return (c >= 0xc7 && c <= 0xc9) || (c >= 0xd4 && c <= 0xd8) }

// isMap reports a map header code: fixmap, map16, map32.
func isMap(c byte) bool { return (c >= 0x80 && c <= 0x8f) || c == 0xde || c == 0xdf }
