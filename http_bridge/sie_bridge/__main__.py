from sie_bridge.cli import main

main()
