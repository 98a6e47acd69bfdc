module modelfleet.local/pause

go 1.21
