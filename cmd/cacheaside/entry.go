package main

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/seed-b4ec662f/cacheaside/internal/wire"
	"strconv"
	"strings"
	"time"

	"github.com/vmihailenco/msgpack/v5"

	"github.com/seed-b4ec662f/cacheaside/internal/bounded"
	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// Kinds as the CLI prints them. The first four are the entry kinds of the
// envelope; "generation" is the generation key of a namespace, a tag or a
// cache's Clear; "foreign" is
// anything else.
const (
	kindValue      = "value"
	kindTombstone  = "tombstone"
	kindLease      = "lease"
	kindRefreshing = "refreshing"
	kindGeneration = "generation"
	kindForeign    = "foreign"
)

func kindName(k envelope.Kind) string {
	switch k {
	case envelope.Value:
		return kindValue
	case envelope.NotFound:
		return kindTombstone
	case envelope.Lease:
		return kindLease
	case envelope.Refreshing:
		return kindRefreshing
	}
	return k.String()
}

// codecName names a codec format byte.
func codecName(f byte) string {
	switch f {
	case wire.FormatJSON:
		return "json"
	case wire.FormatMsgpack:
		return "msgpack"
	}
	return "custom"
}

// namespaceOf returns the namespace tag and generation key of key, as the
// library finds them (wire.GenerationKey).
func namespaceOf(key string) (ns, genKey string, ok bool) {
	genKey, ok = wire.GenerationKey(key)
	if !ok {
		return "", "", false
	}
	return strings.TrimSuffix(genKey, wire.GenerationSuffix), genKey, true
}

// isGenKey reports whether key, holding size bytes, is the generation key
// of a namespace, a tag or a cache's Clear.
func isGenKey(key string, size int64) bool {
	if size != envelope.GenSize {
		return false
	}
	if strings.HasPrefix(key, wire.TagKeyPrefix) || strings.HasPrefix(key, wire.ClearKeyPrefix) {
		return true
	}
	_, gk, ok := namespaceOf(key)
	return ok && gk == key
}

// foreignError says that the bytes under a key are not a cacheaside entry.
type foreignError struct {
	key  string
	why  string
	data []byte
}

func (e *foreignError) Error() string {
	return fmt.Sprintf("%s: not a cacheaside entry (%s); %d bytes, first bytes: %s", e.key, e.why, len(e.data), quoteStart(e.data, 32))
}

// decodeEntry decodes the bytes under key, or says why they are not an
// entry.
func decodeEntry(key string, b []byte) (envelope.Entry, error) {
	var e envelope.Entry
	err := envelope.Decode(b, &e)
	if err == nil {
		return e, nil
	}
	why := err.Error()
	switch {
	case errors.Is(err, envelope.ErrMagic):
		why = fmt.Sprintf("first byte 0x%02x, an entry starts with 0x%02x", b[0], envelope.Magic)
	case errors.Is(err, envelope.ErrNoEnvelope):
		why = "empty string"
	}
	return e, &foreignError{key: key, why: why, data: b}
}

// quoteStart quotes the first n bytes of b, marking a cut.
func quoteStart(b []byte, n int) string {
	if len(b) <= n {
		return strconv.Quote(string(b))
	}
	return strconv.Quote(string(b[:n])) + "..."
}

// renderValue renders a payload as JSON when its codec allows: JSON as it
// is (compacted), msgpack decoded into interface{} and re-encoded. Other
// codecs give nil, and so does a payload its codec cannot read (err says
// why).
func renderValue(format byte, payload []byte) (json.RawMessage, error) {
	switch format {
	case wire.FormatJSON:
		var buf bytes.Buffer
		if err := json.Compact(&buf, payload); err != nil {
			return nil, fmt.Errorf("payload is not valid JSON: %v", err)
		}
		return buf.Bytes(), nil
	case wire.FormatMsgpack:
		// The library's own check: a header that declares more than the
		// payload holds would make the decoder allocate without bound.
		if err := bounded.Msgpack(payload); err != nil {
			return nil, fmt.Errorf("payload is not valid msgpack: %v", err)
		}
		dec := msgpack.NewDecoder(bytes.NewReader(payload))
		dec.SetMapDecoder(func(d *msgpack.Decoder) (any, error) { return d.DecodeUntypedMap() })
		var v any
		if err := dec.Decode(&v); err != nil {
			return nil, fmt.Errorf("payload is not valid msgpack: %v", err)
		}
		out, err := json.Marshal(jsonable(v))
		if err != nil {
			return nil, fmt.Errorf("msgpack value has no JSON form: %v", err)
		}
		return out, nil
	}
	return nil, nil
}

// jsonable converts what msgpack decodes into interface{} into values
// encoding/json accepts: maps with non-string keys get their keys printed.
func jsonable(v any) any {
	switch x := v.(type) {
	case map[any]any:
		m := make(map[string]any, len(x))
		for k, val := range x {
			ks, ok := k.(string)
			if !ok {
				ks = fmt.Sprint(k)
			}
			m[ks] = jsonable(val)
		}
		return m
	case map[string]any:
		m := make(map[string]any, len(x))
		for k, val := range x {
			m[k] = jsonable(val)
		}
		return m
	case []any:
		s := make([]any, len(x))
		for i, val := range x {
			s[i] = jsonable(val)
		}
		return s
	}
	return v
}

// hexStart is the hex of the first n bytes of b, marking a cut.
func hexStart(b []byte, n int) string {
	if len(b) <= n {
		return hex.EncodeToString(b)
	}
	return hex.EncodeToString(b[:n]) + "..."
}

// fmtDur prints a duration rounded to the millisecond.
func fmtDur(d time.Duration) string {
	return d.Round(time.Millisecond).String()
}

// fmtPTTL prints a PTTL reply: -1 no expiry.
func fmtPTTL(ms int64) string {
	if ms < 0 {
		return "none"
	}
	return fmtDur(time.Duration(ms) * time.Millisecond)
}

// pttlMillis converts go-redis's PTTL reply, which keeps -1 and -2 as they
// are, to milliseconds.
func pttlMillis(d time.Duration) int64 {
	if d < 0 {
		return int64(d)
	}
	return d.Milliseconds()
}
