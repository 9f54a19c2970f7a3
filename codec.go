// Codecs: how a value becomes the payload of an entry (JSON, msgpack).

package cacheaside

import (
	"encoding/json"

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
func Msgpack[T any]() Codec[T] { return msgpackCodec[T]{} }

// FormatJSON and FormatMsgpack are the format bytes of the built-in codecs.
const (
	FormatJSON    byte = 1
	FormatMsgpack byte = 2
)

type jsonCodec[T any] struct{}

func (jsonCodec[T]) Format() byte                      { return FormatJSON }
func (jsonCodec[T]) Marshal(v T) ([]byte, error)       { return json.Marshal(v) }
func (jsonCodec[T]) Unmarshal(data []byte, v *T) error { return json.Unmarshal(data, v) }

type msgpackCodec[T any] struct{}

func (msgpackCodec[T]) Format() byte { return FormatMsgpack }

func (msgpackCodec[T]) Marshal(v T) ([]byte, error) {
	return msgpack.Marshal(v)
}

// Unmarshal checks first that no header in data declares more elements or
// bytes than data holds (internal/bounded): msgpack sizes some slices from
// the header before reading, and a 45-byte value declaring 2^32-1
// elements would ask the runtime for 64 GiB, a fatal error no recover
// catches. Such bytes are a corrupt entry like any other.
func (msgpackCodec[T]) Unmarshal(data []byte, v *T) error {
	if err := bounded.Msgpack(data); err != nil {
		return err
	}
	return msgpack.Unmarshal(data, v)
}
