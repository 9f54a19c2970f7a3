-- acquire: observe a miss and take the lease in one step.
-- KEYS[1]  the entry key
-- ARGV[1]  the lease entry to write (header with kind=lease and a fresh token)
-- ARGV[2]  lease lifetime in milliseconds (relative, server clock)
-- ARGV[3]  token of an entry the caller found undecodable and may replace, or ""
-- Returns {1} when the caller holds the lease (including a client retry of a
-- call that already took it), or {0, current} when another entry is there.
local cur = redis.pcall('GET', KEYS[1])
if type(cur) == 'string' then
  local valid = #cur >= 40 and string.sub(cur, 1, 2) == string.sub(ARGV[1], 1, 2)
  if valid then
    local tok = string.sub(cur, 5, 20)
    if tok == string.sub(ARGV[1], 5, 20) and string.byte(cur, 3) == 3 then
      return {1}
    end
    if ARGV[3] == '' or tok ~= ARGV[3] then
      return {0, cur}
    end
  end
end
-- absent, foreign bytes, another format version, a non-string type, or the
-- undecodable entry the caller named: take it over.
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {1}
