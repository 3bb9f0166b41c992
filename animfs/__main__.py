from animfs.cli import main

raise SystemExit(main())
