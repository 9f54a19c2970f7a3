// Cacheaside looks inside the Redis entries that the
// github.com/seed-b4ec662f/cacheaside library writes, and invalidates them
// exactly as the library does.
//
// Install it from a clone of the repository with
//
//	go install ./cmd/cacheaside
//
// or, once a version is released, with
//
//	go install github.com/seed-b4ec662f/cacheaside/cmd/cacheaside@v0.1.0
//
// Usage:
//
//	cacheaside [flags] inspect KEY
//	cacheaside [flags] scan PREFIX
//	cacheaside [flags] invalidate [--cache NAME] key KEY...
//	cacheaside [flags] invalidate [--cache NAME] prefix PREFIX
//	cacheaside [flags] invalidate [--cache NAME] namespace NS
//	cacheaside [flags] invalidate [--cache NAME] tag TAG...
//	cacheaside [flags] invalidate [--cache NAME] clear
//
// # Connecting
//
// --redis URL names the server: redis://[user:password@]host:port/db, or
// rediss:// for TLS, with go-redis's query options (dial_timeout=1s, ...);
// see redis.ParseURL. The default is $REDIS_URL, else
// redis://127.0.0.1:6379/0. For a Redis Cluster, add --cluster: the URL
// is then read by redis.ParseClusterURL, and more seed nodes go in addr=
// parameters:
//
//	cacheaside --cluster --redis 'redis://10.0.0.1:7000?addr=10.0.0.2:7000&addr=10.0.0.3:7000' scan v1:tasks:
//
// (There is no redis+cluster:// form.) --timeout (default 10s) bounds the
// whole command, connecting included; the command first sends a PING, so
// a Redis that is down or black-holed fails fast with a short message
// instead of hanging. --json switches any command to machine-readable
// output. These flags go before or after the command name.
//
// # inspect
//
// inspect decodes the entry under KEY: its kind (value, tombstone,
// lease or refreshing), the codec that wrote it, its 128-bit token, its
// soft expiry (as an absolute time and the time left, negative once past),
// the key's Redis TTL (PTTL), how long the load that filled it took, and
// its value. JSON values are printed as they are; msgpack values are
// decoded and printed as JSON; values of other codecs are shown as their
// size and first bytes in hex. It reads at most --max-bytes of the entry
// (default 1 MiB and the header, the library's default MaxValueSize): a
// larger entry is described from its header, and its value is not read.
// A msgpack payload whose headers declare more than it holds is reported
// as not valid, as the library treats it, rather than decoded.
//
// In text mode, key names, values and error messages are printed with
// control characters, bidi controls and bytes that are not UTF-8 escaped
// as Go escapes (\x1b, \u202e): they are data, and must not drive the
// terminal. --json output is escaped by the JSON encoder.
//
//	$ cacheaside inspect v1:tasks:42
//	key          v1:tasks:42
//	kind         value
//	codec        json (1)
//	token        5ed0ad0e5a41a91b48dd315e89cad063
//	soft expiry  2026-12-03T04:00:05.42Z (4m44.358s left)
//	redis ttl    4m44.359s
//	written      2026-12-03T03:55:05.408Z (15.654s ago)
//	load time    12ms
//	namespace    not namespaced
//	size         97 bytes (48 header, 49 payload)
//	value        {"id":42,"title":"Write the CLI","status":"done"}
//
// For a key of a namespace (a key built with Namespace.Key, such as
// v1:task_lists:{org:acme}:status:done:page:2), inspect also reads the
// namespace's generation key, as a Get does, and says whether the entry's
// generation is the current one. After InvalidateNamespace (or
// "cacheaside invalidate namespace"), it is not, and Gets treat the entry
// as a miss:
//
//	$ cacheaside inspect 'v1:task_lists:{org:acme}:status:done:page:2'
//	key          v1:task_lists:{org:acme}:status:done:page:2
//	kind         value
//	codec        msgpack (2)
//	token        b9de8349093dca8022ab0d2d063a1bdd
//	soft expiry  2026-12-03T04:00:04.211Z (4m43.103s left)
//	redis ttl    4m43.104s
//	written      2026-12-03T03:55:04.208Z (16.9s ago)
//	load time    3ms
//	namespace    v1:task_lists:{org:acme}
//	generation   2c9045321d50b711 (current: false; the namespace is at 1d1c4ecedf2cb477)
//	size         94 bytes (48 header, 46 payload)
//	value        [{"ID":42,"Status":"done","Title":"Write the CLI"}]
//
// (Before the bump, the same line read "2c9045321d50b711 (current: true)".
// This cache's codec is msgpack, and its type has no msgpack tags, hence
// the field names.)
//
// A tombstone (a cached "not found") has no value; a lease (a load in
// progress) says whether other callers wait for its fill ("contended"); a
// refreshing entry (a value being reloaded in the background) shows when
// its holder's lease runs out, by Redis's clock. Inspecting a namespace's
// generation key (…:#gen) prints the generation.
//
// With --json, inspect prints one object: key, kind, codec, codec_id,
// token, soft_expiry {at, unix_ms, in_ms}, pttl_ms (-1: no expiry),
// load_ms, written {at, unix_ms, in_ms} (in_ms negative: its age), contended, refresh_deadline, namespace (null, or {namespace,
// generation_key, entry_generation, current_generation, current}), size,
// payload_size, and value, value_hex or value_error.
//
// # scan
//
// scan lists every key that starts with PREFIX (taken literally: glob
// characters in it match only themselves), with its kind, its size in
// bytes and its TTL. Like the library's InvalidatePrefix, it runs SCAN with
// MATCH on every master of a cluster. It reads only the first 48 bytes of
// each key, so large values are not transferred. Keys whose bytes are not
// cacheaside entries, and keys of other Redis types, are listed as
// "foreign"; the generation keys of namespaces, tags and Clear as
// "generation".
//
//	$ cacheaside scan v1:task
//	KEY                                          KIND            SIZE  TTL
//	v1:task_lists:{org:acme}:#gen                generation      8     10m0.947s
//	v1:task_lists:{org:acme}:status:done:page:2  value           86    4m43.123s
//	v1:tasks:404                                 tombstone       40    54.717s
//	v1:tasks:42                                  value           89    4m44.332s
//	v1:tasks:h                                   foreign (hash)  -     none
//	v1:tasks:legacy                              foreign         11    none
//	6 keys: 2 value, 1 tombstone, 1 generation, 2 foreign
//
// The list is sorted by key. With --json, scan prints one object per
// line: {"key", "kind", "codec", "type" (of a non-string key), "size" (-1
// for a non-string key), "pttl_ms"}.
//
// # invalidate
//
// invalidate calls the library itself: it builds a Cache on the connection
// and calls Invalidate, InvalidatePrefix, InvalidateNamespace,
// InvalidateTags or Clear, so it deletes what they delete (UNLINK; SCAN
// with MATCH on every master; a new random generation of a namespace, of
// each tag, or of the cache's Clear) and publishes the same message on the
// local tier's invalidation bus, so processes that hold the entries in
// their local tiers (Options.Local) drop them at once.
//
// The bus channel is "cacheaside:invalidate:" followed by the caches'
// Options.Name, so give that name with --cache (default "default", the
// library's default name), or their LocalOptions.Channel with --channel if
// they set one. The output says where the message went and how many
// subscribers it reached (other than the command itself; on a Cluster,
// summed over every node), and a warning on stderr says when nobody
// subscribes: the usual sign of a wrong --cache. Caches without a local
// tier do not subscribe and do not need the message. On a server that
// refuses SUBSCRIBE, nothing is published: no process can hold a local
// tier there. For a namespace, give --ttl the caches'
// Policy.TTL plus their stale window (default 5m): the new generation key
// then lives 2 × (TTL + stale window) + LeaseTTL, as the caches' own
// generation keys do, and the caches renew it on every load anyway.
//
//	$ cacheaside invalidate --cache task_list namespace 'v1:task_lists:{org:acme}'
//	namespace v1:task_lists:{org:acme}: generation 2c9045321d50b711 -> 1d1c4ecedf2cb477
//	published on cacheaside:invalidate:task_list to 2 subscribers
//
//	$ cacheaside invalidate --cache task key v1:tasks:42 v1:tasks:43
//	deleted 1 of 2 keys
//	published on cacheaside:invalidate:task to 2 subscribers
//
//	$ cacheaside invalidate --json --cache task key v1:tasks:404
//	{"op":"key","keys":["v1:tasks:404"],"deleted":1,"channel":"cacheaside:invalidate:task","subscribers":2}
//
//	$ cacheaside invalidate --cache task prefix v1:tasks:
//	deleted 2 keys under "v1:tasks:"
//	published on cacheaside:invalidate:task to 2 subscribers
//
//	$ cacheaside invalidate --cache task_list tag org:acme assignee:7
//	tags org:acme, assignee:7: new generations; every entry carrying one is a miss from now on
//	published on cacheaside:invalidate:task_list to 2 subscribers
//
// NS is the namespace as Namespace.String prints it (its generation key is
// accepted too). TAG is a tag as the caches' Options.Tags gives it; the
// generations of tags and of Clear belong to the caches' Name, so --cache
// decides which caches they reach. A failed invalidation is reported and not retried in the
// background (the command exits): run it again.
//
// # Errors and exit codes
//
// The exit code is 0 on success, 1 when the command failed, and 2 when
// the command line is wrong. Failures are one line on stderr:
//
//	cacheaside inspect: v1:tasks:nope: no such key
//	cacheaside inspect: v1:tasks:legacy: not a cacheaside entry (first byte 0x68, an entry starts with 0xca); 11 bytes, first bytes: "hello world"
//	cacheaside inspect: v1:tasks:h: holds a Redis hash, not a string: not a cacheaside entry
//	cacheaside scan: cannot reach Redis at redis://127.0.0.1:1: dial tcp 127.0.0.1:1: connect: connection refused
//	cacheaside inspect: cannot reach Redis at redis://127.0.0.1:16399: no answer after 2.002s (--timeout 2s)
//
// Passwords in URLs are masked in messages.
package main
