// Codecs: how a value becomes the payload of an entry (JSON, msgpack).

package cacheaside

import (
	"encoding/json"
	"github.com/seed-b4ec662f/cacheaside/internal/wire"
	"reflect"

	"github.com/vmihailenco/msgpack/v5"

	"github.com/seed-b4ec662f/cacheaside/internal/bounded"
)

// Codec turns values into bytes and back. Format is stored in every entry
// the codec writes; an entry whose format byte differs from the reading
// cache's codec is treated as corrupt (a miss that is reloaded and
// overwritten), so switching codecs never misreads old entries.
//
// Built-in formats: 1 JSON, 2 msgpack. Pick a format in 128..255 for your
// own codecs.
type Codec[T any] interface {
	Format() byte
	Marshal(v T) ([]byte, error)
	Unmarshal(data []byte, v *T) error
}

// JSON returns the default codec, encoding/json.
func JSON[T any]() Codec[T] { return jsonCodec[T]{} }

// Msgpack returns a codec using github.com/vmihailenco/msgpack/v5, which is
// smaller and usually faster than JSON. Struct fields are named by their
// `msgpack` tags (not their `json` tags).
func Msgpack[T any]() Codec[T] { return msgpackCodec[T]{maps: holdsMap(reflect.TypeFor[T]())} }

// formatJSON and formatMsgpack are the format bytes of the built-in codecs.
const (
	formatJSON    = wire.FormatJSON
	formatMsgpack = wire.FormatMsgpack
)

type jsonCodec[T any] struct{}

func (jsonCodec[T]) Format() byte                      { return formatJSON }
func (jsonCodec[T]) Marshal(v T) ([]byte, error)       { return json.Marshal(v) }
func (jsonCodec[T]) Unmarshal(data []byte, v *T) error { return json.Unmarshal(data, v) }

type msgpackCodec[T any] struct {
	maps bool // T holds a Go map of interface values: see holdsMap
}

func (msgpackCodec[T]) Format() byte { return formatMsgpack }

func (msgpackCodec[T]) Marshal(v T) ([]byte, error) {
	return msgpack.Marshal(v)
}

// Unmarshal checks first that no header in data declares more elements or
// bytes than data holds (internal/bounded): msgpack sizes some slices from
// the header before reading, and a 45-byte value declaring 2^32-1
// elements would ask the runtime for 64 GiB, a fatal error no recover
// catches. Such bytes are a corrupt entry like any other.
func (c msgpackCodec[T]) Unmarshal(data []byte, v *T) error {
	check := bounded.Msgpack
	if c.maps {
		check = bounded.MsgpackForMaps
	}
	if err := check(data); err != nil {
		return err
	}
	return msgpack.Unmarshal(data, v)
}

// holdsMap reports whether a value of type t can hold a Go map that
// itself holds an interface (map[string]any, a struct field of type
// map[int][]any, ...). Where msgpack expects such a map it skips an
// extension header and reads the map from the extension's payload, which
// bounded.Msgpack treats as opaque, and the interface values of its
// entries from whatever follows: an interface slice sized from a header
// nobody checked. Maps of concrete types are left to msgpack's own caps
// (a million entries, a megabyte of bytes); an interface outside a map
// decodes by its bytes and never takes that path.
func holdsMap(t reflect.Type) bool { return holdsMapSeen(t, false, map[reflect.Type]bool{}) }

func holdsMapSeen(t reflect.Type, inMap bool, seen map[reflect.Type]bool) bool {
	if seen[t] {
		return false
	}
	seen[t] = true
	defer delete(seen, t)
	switch t.Kind() {
	case reflect.Interface:
		return inMap
	case reflect.Map:
		return holdsMapSeen(t.Key(), true, seen) || holdsMapSeen(t.Elem(), true, seen)
	case reflect.Pointer, reflect.Slice, reflect.Array:
		return holdsMapSeen(t.Elem(), inMap, seen)
	case reflect.Struct:
		for i := range t.NumField() {
			if holdsMapSeen(t.Field(i).Type, inMap, seen) {
				return true
			}
		}
	}
	return false
}
