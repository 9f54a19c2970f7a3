package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"github.com/seed-b4ec662f/cacheaside/internal/wire"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// inspection is what inspect reports about one key; --json prints it as
// it is.
type inspection struct {
	Key             string          `json:"key"`
	Kind            string          `json:"kind"`                       // value, tombstone, lease, refreshing, generation
	Codec           string          `json:"codec,omitempty"`            // json, msgpack, custom
	CodecID         byte            `json:"codec_id,omitempty"`         // the format byte
	Token           string          `json:"token,omitempty"`            // 32 hex digits
	SoftExpiry      *instant        `json:"soft_expiry,omitempty"`      // absent: none
	PTTLMillis      int64           `json:"pttl_ms"`                    // -1: no expiry
	LoadMillis      *uint32         `json:"load_ms,omitempty"`          // value and tombstone
	Written         *instant        `json:"written,omitempty"`          // value, tombstone, refreshing: when it was stored (in_ms negative: its age)
	Contended       *bool           `json:"contended,omitempty"`        // lease: another caller waits for its fill
	RefreshDeadline *instant        `json:"refresh_deadline,omitempty"` // refreshing: when its holder's lease runs out
	Namespace       *nsInfo         `json:"namespace"`                  // null: not namespaced
	Generation      string          `json:"generation,omitempty"`       // a generation key's value
	Size            int             `json:"size"`                       // bytes under the key
	PayloadSize     int             `json:"payload_size"`               // of which the codec's payload
	Value           json.RawMessage `json:"value,omitempty"`            // json and msgpack payloads
	ValueHex        string          `json:"value_hex,omitempty"`        // other payloads: the first 64 bytes
	ValueError      string          `json:"value_error,omitempty"`      // a payload its codec cannot read
}

// instant is a point in time and how far it is from now.
type instant struct {
	At     time.Time `json:"at"`
	UnixMs int64     `json:"unix_ms"`
	InMs   int64     `json:"in_ms"` // negative: past
}

func instantAt(unixMs int64, now time.Time) *instant {
	at := time.UnixMilli(unixMs).UTC()
	return &instant{At: at, UnixMs: unixMs, InMs: at.Sub(now).Milliseconds()}
}

// nsInfo is the namespace of a key and how its entry's generation compares
// with the namespace's current one.
type nsInfo struct {
	Namespace  string  `json:"namespace"`
	GenKey     string  `json:"generation_key"`
	EntryGen   *string `json:"entry_generation"`   // null: the entry carries none (a lease)
	CurrentGen *string `json:"current_generation"` // null: the namespace has no generation now
	Current    *bool   `json:"current"`            // entry_generation == current_generation; null for a lease
}

// defaultMaxBytes is how much of an entry inspect reads unless --max-bytes
// says otherwise: the library's default MaxValueSize and the header.
const defaultMaxBytes = wire.DefaultMaxValueSize + envelope.HeaderSize

func cmdInspect(ctx context.Context, cfg *config, args []string, stdout, stderr io.Writer) error {
	maxBytes := defaultMaxBytes
	rest, err := parseFlags("inspect", cfg, args, stderr, func(fs *flag.FlagSet) {
		fs.IntVar(&maxBytes, "max-bytes", maxBytes, "read at most this many bytes of the entry; a larger value is described, not decoded")
	})
	if err != nil {
		return err
	}
	if len(rest) != 1 || rest[0] == "" {
		return usagef("inspect takes one KEY (got %d arguments)", len(rest))
	}
	if maxBytes < envelope.HeaderSize {
		return usagef("--max-bytes must be at least the %d-byte header, not %d", envelope.HeaderSize, maxBytes)
	}
	ctx, rdb, done, err := session(ctx, cfg)
	if err != nil {
		return err
	}
	defer done()
	in, err := inspect(ctx, rdb, rest[0], maxBytes)
	if err != nil {
		return describeRedisErr(ctx, cfg, err)
	}
	if cfg.json {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(in)
	}
	return printInspection(stdout, in)
}

// errWrongType is a key of another Redis type than string.
type errWrongType struct{ key, typ string }

func (e *errWrongType) Error() string {
	return fmt.Sprintf("%s: holds a Redis %s, not a string: not a cacheaside entry", e.key, e.typ)
}

func isWrongType(err error) bool {
	return err != nil && strings.HasPrefix(err.Error(), "WRONGTYPE")
}

// inspect reads key (its size, at most maxBytes of it and its PTTL in one
// pipeline, then the namespace's generation) and decodes it. An entry
// larger than maxBytes is described from its header; its value is not
// decoded.
func inspect(ctx context.Context, rdb redis.UniversalClient, key string, maxBytes int) (*inspection, error) {
	var size *redis.IntCmd
	var get *redis.StringCmd
	var ttl *redis.DurationCmd
	_, _ = rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		size = p.StrLen(ctx, key)
		get = p.GetRange(ctx, key, 0, int64(maxBytes)-1)
		ttl = p.PTTL(ctx, key)
		return nil
	})
	b, err := get.Bytes()
	if err == nil {
		err = size.Err()
	}
	switch {
	case err == nil && ttl.Err() == nil && ttl.Val() == -2*time.Nanosecond:
		return nil, fmt.Errorf("%s: no such key", key) // PTTL -2: go-redis keeps it in nanoseconds
	case isWrongType(err):
		typ, terr := rdb.Type(ctx, key).Result()
		if terr != nil {
			typ = "non-string type"
		}
		return nil, &errWrongType{key: key, typ: typ}
	case err != nil:
		return nil, err
	case ttl.Err() != nil:
		return nil, ttl.Err()
	}
	in := &inspection{Key: key, Size: int(size.Val()), PTTLMillis: pttlMillis(ttl.Val())}
	cut := in.Size > len(b) // over --max-bytes: header only
	if isGenKey(key, int64(in.Size)) {
		ns, _, _ := namespaceOf(key)
		in.Kind = kindGeneration
		in.Namespace = &nsInfo{Namespace: ns, GenKey: key}
		in.Generation = hex.EncodeToString(b)
		return in, nil
	}
	e, err := decodeEntry(key, b)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	in.Kind = kindName(e.Kind)
	in.Codec, in.CodecID = codecName(e.Format), e.Format
	in.Token = hex.EncodeToString(e.Token[:])
	in.PayloadSize = in.Size - envelope.HeaderSize
	if e.SoftExpiry != 0 {
		in.SoftExpiry = instantAt(e.SoftExpiry, now)
	}
	if e.Written != 0 {
		in.Written = instantAt(e.Written, now)
	}
	switch e.Kind {
	case envelope.Value, envelope.NotFound:
		in.LoadMillis = &e.LoadMillis
	case envelope.Lease:
		c := e.LoadMillis != 0
		in.Contended = &c
	case envelope.Refreshing:
		in.RefreshDeadline = refreshDeadline(ctx, rdb, e.LoadMillis, now)
	}
	if cut && (e.Kind == envelope.Value || e.Kind == envelope.Refreshing) {
		in.ValueError = fmt.Sprintf("not read: %d bytes, over --max-bytes %d", in.Size, maxBytes)
		in.ValueHex = hexStart(e.Payload, 64)
	} else if e.Kind == envelope.Value || e.Kind == envelope.Refreshing {
		v, verr := renderValue(e.Format, e.Payload)
		switch {
		case verr != nil:
			in.ValueError = verr.Error()
			in.ValueHex = hexStart(e.Payload, 64)
		case v != nil:
			in.Value = v
		default:
			in.ValueHex = hexStart(e.Payload, 64)
		}
	}
	if ns, gk, ok := namespaceOf(key); ok && (e.Gen != envelope.Gen{} || e.Kind == envelope.Lease) {
		info, err := namespaceInfo(ctx, rdb, ns, gk, e)
		if err != nil {
			return nil, err
		}
		in.Namespace = info
	}
	return in, nil
}

// refreshDeadline turns a refreshing entry's lease deadline (Redis server
// time in milliseconds mod 2^32) into an instant, using Redis's clock
// (this machine's if TIME fails).
func refreshDeadline(ctx context.Context, rdb redis.UniversalClient, deadline uint32, now time.Time) *instant {
	server := now
	if t, err := rdb.Time(ctx).Result(); err == nil {
		server = t
	}
	left := time.Duration(int32(deadline-uint32(server.UnixMilli()))) * time.Millisecond
	return instantAt(now.Add(left).UnixMilli(), now)
}

// namespaceInfo reads the namespace's generation key, as a namespaced Get
// does, and compares it with the entry's generation. Like the library, it
// counts a missing or unreadable generation key as "nothing is current".
func namespaceInfo(ctx context.Context, rdb redis.UniversalClient, ns, genKey string, e envelope.Entry) (*nsInfo, error) {
	info := &nsInfo{Namespace: ns, GenKey: genKey}
	cur, err := rdb.Get(ctx, genKey).Bytes()
	switch {
	case errors.Is(err, redis.Nil) || isWrongType(err):
	case err != nil:
		return nil, err
	case len(cur) == envelope.GenSize:
		s := hex.EncodeToString(cur)
		info.CurrentGen = &s
	}
	if e.Kind == envelope.Lease {
		return info, nil
	}
	s := hex.EncodeToString(e.Gen[:])
	info.EntryGen = &s
	current := info.CurrentGen != nil && *info.CurrentGen == s
	info.Current = &current
	return info, nil
}

// printInspection writes in as aligned "field  value" lines.
func printInspection(w io.Writer, in *inspection) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	line := func(k, format string, args ...any) {
		fmt.Fprintf(tw, "%s\t%s\n", k, termSafe(fmt.Sprintf(format, args...)))
	}
	line("key", "%s", in.Key)
	line("kind", "%s", in.Kind)
	if in.Kind == kindGeneration {
		line("namespace", "%s", in.Namespace.Namespace)
		line("generation", "%s", in.Generation)
		line("redis ttl", "%s", fmtPTTL(in.PTTLMillis))
		return tw.Flush()
	}
	line("codec", "%s (%d)", in.Codec, in.CodecID)
	line("token", "%s", in.Token)
	if in.SoftExpiry == nil {
		line("soft expiry", "none")
	} else {
		line("soft expiry", "%s (%s)", in.SoftExpiry.At.Format(time.RFC3339Nano), relative(in.SoftExpiry.InMs))
	}
	line("redis ttl", "%s", fmtPTTL(in.PTTLMillis))
	if in.Written != nil {
		line("written", "%s (%s ago)", in.Written.At.Format(time.RFC3339Nano), fmtDur(max(-time.Duration(in.Written.InMs)*time.Millisecond, 0)))
	}
	switch {
	case in.LoadMillis != nil:
		if *in.LoadMillis == 0 {
			line("load time", "under 1ms")
		} else {
			line("load time", "%s", fmtDur(time.Duration(*in.LoadMillis)*time.Millisecond))
		}
	case in.Contended != nil && *in.Contended:
		line("contended", "yes: other callers wait for this lease's fill")
	case in.Contended != nil:
		line("contended", "no")
	case in.RefreshDeadline != nil:
		line("refresh lease", "%s (%s; Redis clock)", in.RefreshDeadline.At.Format(time.RFC3339Nano), relative(in.RefreshDeadline.InMs))
	}
	printNamespace(line, in.Namespace)
	line("size", "%d bytes (%d header, %d payload)", in.Size, in.Size-in.PayloadSize, in.PayloadSize)
	switch {
	case in.Kind == kindTombstone:
		line("value", "none: the loader said the item does not exist")
	case in.Kind == kindLease:
		line("value", "none yet: a load is in progress")
	case in.Value != nil:
		line("value", "%s", in.Value)
	case in.ValueError != "":
		line("value", "%s; hex %s", in.ValueError, in.ValueHex)
	default:
		line("value", "%d bytes of codec %d, hex %s", in.PayloadSize, in.CodecID, in.ValueHex)
	}
	return tw.Flush()
}

func printNamespace(line func(k, format string, args ...any), ns *nsInfo) {
	if ns == nil {
		line("namespace", "not namespaced")
		return
	}
	line("namespace", "%s", ns.Namespace)
	cur := "the namespace has no generation now"
	if ns.CurrentGen != nil {
		cur = "the namespace is at " + *ns.CurrentGen
	}
	switch {
	case ns.EntryGen == nil:
		line("generation", "none: a lease carries no generation (%s)", cur)
	case *ns.Current:
		line("generation", "%s (current: true)", *ns.EntryGen)
	default:
		line("generation", "%s (current: false; %s)", *ns.EntryGen, cur)
	}
}

// relative prints the time left until an instant, negative once past:
// "4m59.9s left" or "-4.5s left, past".
func relative(ms int64) string {
	d := time.Duration(ms) * time.Millisecond
	if d < 0 {
		return fmtDur(d) + " left, past"
	}
	return fmtDur(d) + " left"
}
