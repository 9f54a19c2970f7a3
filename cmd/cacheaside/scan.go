package main

import (
	"context"
	"encoding/json"
	"fmt"
	"github.com/seed-b4ec662f/cacheaside/internal/wire"
	"io"
	"slices"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"

	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// scanBatch is the COUNT hint of each SCAN, as in the library's
// InvalidatePrefix, and the size of each pipeline of reads.
const scanBatch = 1000

// scanRow is one key that scan lists; --json prints one per line.
type scanRow struct {
	Key        string `json:"key"`
	Kind       string `json:"kind"`            // value, tombstone, lease, refreshing, generation, foreign
	Codec      string `json:"codec,omitempty"` // of an entry
	Type       string `json:"type,omitempty"`  // the Redis type of a key that is not a string
	Size       int64  `json:"size"`            // bytes (STRLEN); -1 for a key that is not a string
	PTTLMillis int64  `json:"pttl_ms"`         // -1: no expiry
}

func cmdScan(ctx context.Context, cfg *config, args []string, stdout, stderr io.Writer) error {
	rest, err := parseFlags("scan", cfg, args, stderr, nil)
	if err != nil {
		return err
	}
	if len(rest) != 1 {
		return usagef("scan takes one PREFIX (got %d arguments; \"\" lists every key)", len(rest))
	}
	ctx, rdb, done, err := session(ctx, cfg)
	if err != nil {
		return err
	}
	defer done()
	rows, err := scan(ctx, rdb, rest[0])
	if err != nil {
		return describeRedisErr(ctx, cfg, err)
	}
	if cfg.json {
		enc := json.NewEncoder(stdout)
		for i := range rows {
			if err := enc.Encode(&rows[i]); err != nil {
				return err
			}
		}
		return nil
	}
	return printScan(stdout, rows)
}

// node is what scan needs of one Redis node.
type node interface {
	Scan(ctx context.Context, cursor uint64, match string, count int64) *redis.ScanCmd
	Pipelined(ctx context.Context, fn func(redis.Pipeliner) error) ([]redis.Cmder, error)
}

// forEachNode calls fn on every master of a Redis Cluster, as the
// library's InvalidatePrefix does, or on the one server of a Client.
func forEachNode(ctx context.Context, rdb redis.UniversalClient, fn func(context.Context, node) error) error {
	if cc, ok := rdb.(*redis.ClusterClient); ok {
		return cc.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error { return fn(ctx, c) })
	}
	return fn(ctx, rdb)
}

// scan lists every key that starts with prefix (taken literally), sorted.
func scan(ctx context.Context, rdb redis.UniversalClient, prefix string) ([]scanRow, error) {
	pattern := wire.EscapeGlob(prefix) + "*"
	var mu sync.Mutex
	var rows []scanRow
	err := forEachNode(ctx, rdb, func(ctx context.Context, n node) error {
		var cursor uint64
		for {
			keys, next, err := n.Scan(ctx, cursor, pattern, scanBatch).Result()
			if err != nil {
				return err
			}
			got, err := describeKeys(ctx, n, keys)
			if err != nil {
				return err
			}
			mu.Lock()
			rows = append(rows, got...)
			mu.Unlock()
			if cursor = next; cursor == 0 {
				return nil
			}
		}
	})
	if err != nil {
		return nil, err
	}
	slices.SortFunc(rows, func(a, b scanRow) int { return strings.Compare(a.Key, b.Key) })
	// SCAN may return a key twice (when the keyspace is rehashed meanwhile).
	rows = slices.CompactFunc(rows, func(a, b scanRow) bool { return a.Key == b.Key })
	return rows, nil
}

// describeKeys reads the header, length and PTTL of keys on one node, in
// one pipeline (only the header: a large value is not transferred), and
// the type of those that are not strings. Keys deleted since the SCAN are
// left out.
func describeKeys(ctx context.Context, n node, keys []string) ([]scanRow, error) {
	if len(keys) == 0 {
		return nil, nil
	}
	heads := make([]*redis.StringCmd, len(keys))
	lens := make([]*redis.IntCmd, len(keys))
	ttls := make([]*redis.DurationCmd, len(keys))
	_, _ = n.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, k := range keys {
			heads[i] = p.GetRange(ctx, k, 0, envelope.HeaderSize-1)
			lens[i] = p.StrLen(ctx, k)
			ttls[i] = p.PTTL(ctx, k)
		}
		return nil
	})
	rows := make([]scanRow, 0, len(keys))
	var others []int // rows of keys that are not strings
	for i, k := range keys {
		if err := ttls[i].Err(); err != nil {
			return nil, err
		}
		pttl := pttlMillis(ttls[i].Val())
		if pttl == -2 {
			continue // gone since the SCAN
		}
		row := scanRow{Key: k, PTTLMillis: pttl}
		head, err := heads[i].Bytes()
		switch {
		case isWrongType(err):
			row.Kind, row.Size = kindForeign, -1
			others = append(others, len(rows))
		case err != nil:
			return nil, err
		case lens[i].Err() != nil:
			return nil, lens[i].Err()
		default:
			row.Size = lens[i].Val()
			row.Kind, row.Codec = classify(k, head, row.Size)
		}
		rows = append(rows, row)
	}
	if len(others) > 0 {
		types := make([]*redis.StatusCmd, len(others))
		_, _ = n.Pipelined(ctx, func(p redis.Pipeliner) error {
			for j, i := range others {
				types[j] = p.Type(ctx, rows[i].Key)
			}
			return nil
		})
		for j, i := range others {
			rows[i].Type = types[j].Val()
			if rows[i].Type == "" {
				rows[i].Type = "unknown"
			}
		}
	}
	return rows, nil
}

// classify names what a string key holds from its first HeaderSize bytes
// and its length.
func classify(key string, head []byte, size int64) (kind, codec string) {
	if isGenKey(key, size) {
		return kindGeneration, ""
	}
	var e envelope.Entry
	if size < envelope.HeaderSize || envelope.Decode(head, &e) != nil {
		return kindForeign, ""
	}
	if (e.Kind == envelope.NotFound || e.Kind == envelope.Lease) && size != envelope.HeaderSize {
		return kindForeign, "" // these kinds have no payload
	}
	return kindName(e.Kind), codecName(e.Format)
}

// printScan writes rows as a table and a summary line.
func printScan(w io.Writer, rows []scanRow) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY\tKIND\tSIZE\tTTL")
	counts := map[string]int{}
	for _, r := range rows {
		counts[r.Kind]++
		kind, size := r.Kind, strconv.FormatInt(r.Size, 10)
		if r.Type != "" {
			kind, size = fmt.Sprintf("%s (%s)", r.Kind, r.Type), "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", termSafe(r.Key), kind, size, fmtPTTL(r.PTTLMillis))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	var parts []string
	for _, k := range []string{kindValue, kindRefreshing, kindTombstone, kindLease, kindGeneration, kindForeign} {
		if counts[k] > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", counts[k], k))
		}
	}
	noun := "keys"
	if len(rows) == 1 {
		noun = "key"
	}
	if len(parts) == 0 {
		_, err := fmt.Fprintf(w, "0 keys\n")
		return err
	}
	_, err := fmt.Fprintf(w, "%d %s: %s\n", len(rows), noun, strings.Join(parts, ", "))
	return err
}
